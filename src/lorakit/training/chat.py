"""Instruction and chat data: the formats people have, and which tokens the loss sees.

A JSONL row is one of five shapes, detected per file from its fields (`format` forces one):

    text                {"text": "..."}                                   every token is trained
    prompt-completion   {"prompt": "...", "completion": "..."}            the completion's tokens are trained;
                        (or both lists of messages: the conversational variant)
    messages            {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                                                                          every assistant turn is trained
    alpaca              {"instruction": ..., "input": ..., "output": ...} → prompt-completion
    sharegpt            {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} → messages

Where the answers are is read off the chat template's own rendering, never by matching a response-marker
string in the tokens: the text of the conversation up to turn i (with the assistant header the template adds
for a reply) must be a prefix of the text up to turn i + 1, and that of the whole conversation; the assistant's
characters are what lies between, and the tokens that start there are trained, the end-of-turn token with
them (so that the model learns to stop), the whitespace the template puts after a turn not. A template that
marks answers with `{% generation %}` is asked for its own mask instead. A conversation whose rendering
rewrites earlier turns (so that no prefix holds) is refused, naming its line.

Examples longer than `max_length` tokens are cut from the right and counted; an example left with no trained
token is dropped and counted (`DataStats`), never trained on silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lorakit.training.data import IGNORE_INDEX, DataStats, Example, TextDataset, read_rows

__all__ = [
    "FORMATS",
    "LOSS_ON",
    "ROLES",
    "Conversation",
    "check_messages",
    "detect_format",
    "language_dataset",
    "load_chat_template",
    "parse_row",
    "read_conversations",
]

Format = Literal["auto", "text", "prompt-completion", "messages", "alpaca", "sharegpt"]
FORMATS = get_args(Format)
LossOn = Literal["completion", "all"]
LOSS_ON = get_args(LossOn)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = list[dict[str, str]]


@dataclass
class Conversation:
    """One row, in one of three forms: `text`; `prompt` + `completion` (both text, or both messages); or
    `messages`. `line` is its line in the file, for errors."""

    line: int
    text: str | None = None
    prompt: str | Messages | None = None
    completion: str | Messages | None = None
    messages: Messages | None = None


# -- reading rows ------------------------------------------------------------------------------------------------


def detect_format(row: dict[str, Any], text_field: str = "text") -> str | None:
    """The format a row's fields say it is in, or None where they fit none."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if text_field in row:
        return "text"
    return None


def read_conversations(path: str | Path, fmt: str = "auto", text_field: str = "text") -> list[Conversation]:
    """The rows of a data file as Conversations, in one format for the whole file.

    Args:
        path: a .jsonl/.json file (any format), a .csv file with a header (formats of text fields), or a plain
            text file (one text a line).
        fmt: one of FORMATS; "auto" detects it from the first row's fields and holds every row to it.
        text_field: the field of the "text" format.

    Returns:
        One Conversation per non-empty row, with its line number.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a row of no known format, a row of another format than the first (naming
            the first line that differs), or a row that breaks its format's rules (naming the line).
    """
    refusal = None if fmt in ("auto", "text") else f"a plain text file holds texts, not {fmt!r} rows; use JSONL"
    path, rows = Path(path), read_rows(path, text_field, refusal)
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    chosen = None if fmt == "auto" else fmt
    conversations = []
    for line, row in rows:
        where = f"{path}: line {line}"
        found = detect_format(row, text_field)
        if chosen is None:
            if found is None:
                fields = ", ".join(map(str, row)) or "none"
                raise ValueError(
                    f"{path}: line {line} has no field {text_field!r}, nor the fields of another format (prompt and "
                    f"completion, messages, instruction and output, conversations); it has: {fields}"
                )
            chosen = found
        elif fmt == "auto" and found != chosen:
            raise ValueError(f"{where}: a {found or 'unknown'} row in a file of {chosen} rows (from its first line)")
        conversations.append(parse_row(row, chosen, where, text_field))
    return conversations


def parse_row(row: dict[str, Any], fmt: str, where: str, text_field: str = "text") -> Conversation:
    """A row of format `fmt` as a Conversation, checked; `where` ("FILE: line N") names it in errors."""
    line = int(where.rsplit(" ", 1)[-1]) if where.rsplit(" ", 1)[-1].isdigit() else 0
    needed = {"text": [text_field], "alpaca": ["instruction", "output"], "prompt-completion": ["prompt", "completion"]}
    needed |= {"sharegpt": ["conversations"], "messages": ["messages"]}
    missing = [name for name in needed.get(fmt, []) if name not in row]
    if missing:
        raise ValueError(f"{where}: a {fmt} row needs the field {missing[0]!r} (fields: {', '.join(map(str, row))})")
    if fmt == "text":
        return Conversation(line, text=_text(row, text_field, where))
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"{where}: field 'input' must be text, got {extra!r}")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Conversation(line, prompt=prompt, completion=_text(row, "output", where))
    if fmt == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Conversation(line, prompt=_text(row, "prompt", where), completion=_text(row, "completion", where))
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt_messages = check_messages(prompt, f"{where}: 'prompt'", need_answer=False)
            completion_messages = check_messages(completion, f"{where}: 'completion'", need_answer=True)
            return Conversation(line, prompt=prompt_messages, completion=completion_messages)
        raise ValueError(
            f"{where}: 'prompt' and 'completion' must both be text or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    if fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'conversations' must be a list of turns")
        messages = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError(f"{where}: conversations[{k}] must be an object with 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                known = ", ".join(sorted(SHAREGPT_ROLES))
                raise ValueError(f"{where}: conversations[{k}] is from {turn['from']!r}, not one of {known}")
            messages.append({"role": role, "content": turn["value"]})
        return Conversation(line, messages=check_messages(messages, where, need_answer=True))
    if fmt == "messages":
        return Conversation(line, messages=check_messages(row["messages"], where, need_answer=True))
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be text, got {value!r}")
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return value


def check_messages(value: Any, where: str, need_answer: bool = False) -> Messages:
    """A conversation, checked: a non-empty list of {"role": one of ROLES, "content": non-empty text}.

    Args:
        value: the value to check, as read from JSON.
        where: what to name in errors ("data.jsonl: line 3").
        need_answer: refuse a conversation without an assistant turn (training data: nothing to learn).

    Returns:
        The messages, as new dicts holding only "role" and "content".

    Raises:
        ValueError: not a non-empty list of such objects, an unknown role, empty content, or no answer.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: messages must be a non-empty list")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {k} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: message {k} has the unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}: message {k} ({role}) has empty or non-text content")
        messages.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return messages


def load_chat_template(path: str | Path) -> str:
    """A Jinja chat template from a file, compiled as transformers compiles it (sandboxed, with its
    `{% generation %}` tag) to check it; a syntax error names the file and the line."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no chat template file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"{path}: line {error.lineno}: not a valid Jinja template ({error.message})") from None
    return text


# -- which tokens the loss sees -----------------------------------------------------------------------------------


def language_dataset(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    max_length: int,
    loss_on: str = "completion",
    where: str = "data",
) -> TextDataset:
    """Tokenized examples with their labels (IGNORE_INDEX where a token carries no loss), cut to `max_length`.

    Args:
        conversations: parsed rows (`parse_row`).
        tokenizer: a transformers tokenizer; messages need its chat template (`tokenizer.chat_template`).
        max_length: the most tokens an example keeps, from the left.
        loss_on: "completion" trains the completion / assistant turns only; "all" every token.
        where: the file, for errors.

    Returns:
        The examples, with what was done to them (`.stats`).

    Raises:
        ValueError: messages without a chat template; a template whose rendering cannot be split into turns;
            no example left with a trained token.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    stats = DataStats()
    examples = []
    for conversation in conversations:
        input_ids, labels = _tokenize(conversation, tokenizer, loss_on, f"{where}: line {conversation.line}")
        if len(input_ids) > max_length:
            stats.truncated += 1
            input_ids = input_ids[:max_length]
            labels = None if labels is None else labels[:max_length]
        trained = len(input_ids) - 1 if labels is None else sum(label != IGNORE_INDEX for label in labels[1:])
        if trained <= 0:  # nothing left to predict: the answer lay past max_length, or the text is one token
            stats.dropped += 1
            stats.dropped_lines.append(conversation.line)
            continue
        examples.append(Example(input_ids, labels=labels))
    stats.examples = len(examples)
    if not examples:
        raise ValueError(
            f"{where}: no example has a token to learn from within --max-length {max_length} "
            "(answers past it, or texts of one token)"
        )
    return TextDataset(examples, stats=stats)


def _tokenize(
    conversation: Conversation, tokenizer: Any, loss_on: str, where: str
) -> tuple[list[int], list[int] | None]:
    """(input_ids, labels) of one conversation; labels None: every token is trained."""
    c = conversation
    if c.text is not None:
        return list(tokenizer(c.text)["input_ids"]), None
    if c.messages is not None:
        render = _renderer(tokenizer, where)
        if loss_on == "all":
            return _ids(tokenizer, render(c.messages, False)), None
        return _assistant_labels(c.messages, tokenizer, render, where)
    if isinstance(c.prompt, str):  # plain prompt-completion: the completion ends with eos, which is trained too
        completion = c.completion
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids = list(tokenizer(c.prompt)["input_ids"])
        input_ids = list(tokenizer(c.prompt + completion)["input_ids"])
    else:  # conversational prompt-completion: the prompt ends with the template's header for a reply
        render = _renderer(tokenizer, where)
        prompt_ids = _ids(tokenizer, render(c.prompt, True))
        input_ids = _ids(tokenizer, render([*c.prompt, *c.completion], False))
    if loss_on == "all":
        return input_ids, None
    # the completion starts where the two tokenizations part (a merge across the boundary moves it left)
    start = _common_prefix(prompt_ids, input_ids)
    return input_ids, [IGNORE_INDEX] * start + input_ids[start:]


def _renderer(tokenizer: Any, where: str) -> Callable[[Messages, bool], str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: messages need a chat template, and the tokenizer has none: pass --chat-template FILE"
        )

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def _ids(tokenizer: Any, text: str) -> list[int]:
    """A rendered conversation's tokens: the template writes its own special tokens (bos and the like)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_labels(
    messages: Messages, tokenizer: Any, render: Callable[[Messages, bool], str], where: str
) -> tuple[list[int], list[int]]:
    """Every assistant turn trained, from the template's own `{% generation %}` mask where it has one, else from
    the characters each turn adds to the rendering (see the module docstring)."""
    if GENERATION_MARKER.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        return input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(render, messages[:i])
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{where}: the chat template renders the conversation up to turn {i} differently from the whole "
                "conversation (it rewrites earlier turns), so the assistant's answers cannot be found; give this "
                "example as prompt/completion instead"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    input_ids = list(encoded["input_ids"])
    if tokenizer.is_fast:
        starts = [start for start, _ in encoded["offset_mapping"]]
    else:  # a slow tokenizer gives no offsets: the token count of each prefix marks where its text ends
        starts = _token_starts(tokenizer, full, spans)
    labels = [
        token if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for token, start in zip(input_ids, starts, strict=True)
    ]
    return input_ids, labels


def _render_prefix(render: Callable[[Messages, bool], str], messages: Messages) -> str:
    if messages:
        return render(messages, True)
    try:  # the header for a first reply; some templates refuse an empty conversation
        return render([], True)
    except Exception:
        return ""


def _token_starts(tokenizer: Any, full: str, spans: list[tuple[int, int]]) -> list[int]:
    """For a slow tokenizer: a character position per token that puts it inside a span exactly when the tokens of
    the text before the span's end outnumber those before its start."""
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    starts = [-1] * len(ids)
    for s, e in spans:
        first = len(tokenizer(full[:s], add_special_tokens=False)["input_ids"])
        last = len(tokenizer(full[:e], add_special_tokens=False)["input_ids"])
        for k in range(first, min(last, len(ids))):
            starts[k] = s
    return starts


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
