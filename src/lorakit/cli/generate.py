"""`lorakit generate`: try a fine-tuned adapter, answers streamed as they come (see lorakit.inference.generate).

lorakit generate --model ./my-model --adapter run/ --prompt "what colour is the sky"
lorakit generate --model ./my-model --adapter run/ --messages chats.jsonl --compare     # base | adapter
lorakit generate --model ./my-model --adapter fr=run-fr/ --adapter de=run-de/ --prompts prompts.jsonl --json

Rows of a --prompts file that name different adapters run as one mixed batch through one model (per_sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lorakit.io.console import make_console
from lorakit.io.untrusted import loads_json
from lorakit.training.chat import check_messages

if TYPE_CHECKING:
    from lorakit.inference.generate import Prompt

__all__ = ["Item", "adapter_dirs", "add_parser", "read_items", "run"]

MAX_NEW_TOKENS = 128
PROMPTS_FIELDS = ("prompt", "messages", "adapter")


@dataclass
class Item:
    """One prompt to answer: text or messages as given, the adapter it runs with (BASE: none), and where it came
    from ("--prompt", "FILE: line N") for errors."""

    prompt: Prompt
    adapter: str
    where: str


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="try a model and its adapters: answers to prompts, streamed as they come",
        description="Generate answers with a transformers causal language model and LoRA adapters, streamed to the "
        "terminal. Greedy by default; --temperature above 0 samples. Generation stops at the tokenizer's eos or "
        "end-of-turn token, and the answer is printed without the prompt and without special tokens. Rows of a "
        "--prompts file that name different adapters run as one mixed batch through one model.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model: a transformers model directory")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a PEFT-format adapter directory, named after the directory or NAME; repeat for several. The first "
        "answers every prompt that names none (default: no adapter, the base model alone)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt",
        metavar="TEXT",
        help="one prompt: a single user message when the tokenizer has a chat template, plain text to continue "
        "when it has none",
    )
    source.add_argument(
        "--messages",
        metavar="FILE.jsonl",
        help='conversations, one a line: {"messages": [{"role": ..., "content": ...}, ...]}; each is answered as '
        "the assistant's next turn (the chat template with its generation prompt)",
    )
    source.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='prompts, one a line: {"prompt": TEXT} or {"messages": [...]}, with an optional "adapter": NAME (one '
        'of the --adapter names, or "__base__" for none; default: the first adapter)',
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        metavar="N",
        help=f"the most tokens an answer gets (default: {MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 decodes greedily; above 0 samples at this temperature (default: 0)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="when sampling, draw from the smallest set of tokens holding this probability, in (0, 1] (default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the seed of the sampling (default: 0)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also answer each prompt with the base model (adapters off), side by side",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON line per prompt instead, {"prompt", "adapter", "answer"} (and "base_answer" with '
        "--compare), without streaming",
    )
    p.set_defaults(run=run)


# -- reading what to answer -------------------------------------------------------------------------------------


def adapter_dirs(values: list[str]) -> dict[str, Path]:
    """{name: directory} from --adapter values, DIR (named after the directory) or NAME=DIR, in order.

    Raises:
        FileNotFoundError: a directory that does not exist.
        ValueError: a name that cannot be an adapter's, or the same name twice.
    """
    from lorakit.engine.model import ADAPTER_NAME, BASE

    dirs: dict[str, Path] = {}
    for value in values:
        name, equals, rest = value.partition("=")
        if equals and ADAPTER_NAME.fullmatch(name) and not Path(value).expanduser().exists():
            path = Path(rest).expanduser()
        else:
            path = Path(value).expanduser()
            name = path.resolve().name
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter directory at {path}")
        if not ADAPTER_NAME.fullmatch(name) or name == BASE:
            raise ValueError(
                f"--adapter {value}: {name!r} cannot name an adapter (letters, digits, '_' and '-'): give it a name "
                "with NAME=DIR"
            )
        if name in dirs:
            raise ValueError(f"two adapters are named {name!r}: give them other names with NAME=DIR")
        dirs[name] = path
    return dirs


def read_items(path: str | Path, option: str, default_adapter: str) -> list[Item]:
    """The prompts of a JSONL file, checked row by row: with option "--messages" every row holds "messages",
    with "--prompts" "prompt" or "messages"; both may name an "adapter" (default: `default_adapter`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not UTF-8, not JSON, not such an object, or holds bad messages (naming the
            file and the line); a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    items = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}: line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not UTF-8 text ({error.reason})") from None
        if not line.strip():
            continue
        try:
            row = loads_json(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        except ValueError as error:  # valid, and nested too deeply or a number too long
            raise ValueError(f"{where}: {error}") from None
        items.append(_item(row, where, option, default_adapter))
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def _item(row: Any, where: str, option: str, default_adapter: str) -> Item:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    allowed = PROMPTS_FIELDS if option == "--prompts" else ("messages", "adapter")
    unknown = [key for key in row if key not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} ({option} rows hold {', '.join(allowed)})")
    if ("prompt" in row) == ("messages" in row):
        wanted = "'prompt' or 'messages'" if option == "--prompts" else "'messages'"
        raise ValueError(f"{where}: a row holds {wanted}")
    adapter = row.get("adapter", default_adapter)
    if not isinstance(adapter, str):
        raise ValueError(f"{where}: 'adapter' must be a name, got {adapter!r}")
    if "messages" in row:
        return Item(check_messages(row["messages"], where), adapter, where)
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' must be non-empty text, got {row['prompt']!r}")
    return Item(row["prompt"], adapter, where)


def _items(args: argparse.Namespace, default_adapter: str) -> list[Item]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return [Item(args.prompt, default_adapter, "--prompt")]
    if args.messages is not None:
        return read_items(args.messages, "--messages", default_adapter)
    return read_items(args.prompts, "--prompts", default_adapter)


# -- showing the answers ----------------------------------------------------------------------------------------


def _shown_prompt(prompt: Prompt) -> str:
    """A prompt in a table: the text, or the last message of a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class Board:
    """The answers as a table that grows while they stream in: #, prompt, adapter, then one column per kind of
    answer (the base model's with --compare, and the adapter's). On a terminal it is redrawn as text arrives;
    into a file or a pipe it is printed once, at the end."""

    def __init__(self, console: Console, items: list[Item], columns: list[str]):
        self.items = items
        self.answers = {column: [""] * len(items) for column in columns}
        self.live = Live(self.table(), console=console, auto_refresh=False)

    def table(self) -> Table:
        table = Table("#", "prompt", "adapter", *self.answers, show_lines=True)
        for i, item in enumerate(self.items):
            answers = [Text(column[i]) for column in self.answers.values()]
            table.add_row(str(i + 1), Text(_shown_prompt(item.prompt)), Text(item.adapter), *answers)
        return table

    def writer(self, column: str) -> Callable[[int, str], None]:
        """The `stream` callback that adds text to one column's answers."""

        def add(i: int, text: str) -> None:
            self.answers[column][i] += text
            self.live.update(self.table(), refresh=True)

        return add


def _print_piece(i: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- the command ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """Checks the settings, adapter directories and prompt files before loading the model and each prompt against
    the tokenizer before generating; then answers all prompts in one batch: streamed, as a table, or as JSON."""
    import torch

    from lorakit.engine.adapter_files import load_adapter
    from lorakit.engine.model import BASE, disabled
    from lorakit.inference.generate import check_settings, generate, prompt_ids
    from lorakit.training.models import load_model_and_tokenizer, take_run_chat_template

    check_settings(args.max_new_tokens, args.temperature, args.top_p, as_flags=True)
    dirs = adapter_dirs(args.adapter)
    if args.compare and not dirs:
        raise ValueError("--compare needs an --adapter to compare the base model with")
    default_adapter = next(iter(dirs), BASE)
    items = _items(args, default_adapter)
    for item in items:
        if item.adapter != BASE and item.adapter not in dirs:
            given = ", ".join(dirs) or "none"
            raise ValueError(
                f"{item.where}: adapter {item.adapter!r} was not given with --adapter (given: {given}; "
                f"{BASE!r} for none)"
            )
    model, tokenizer = load_model_and_tokenizer(args.model, "causal-lm", None)
    for directory in reversed(dirs.values()):  # the first adapter's training template wins
        take_run_chat_template(tokenizer, directory)
    for name, directory in dirs.items():
        load_adapter(model, directory, name)
    model.to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")).eval()
    for item in items:  # a bad prompt, named by its file and line, before any generation
        prompt_ids(tokenizer, item.prompt, item.where)

    prompts = [item.prompt for item in items]
    routes = [item.adapter for item in items] if dirs else None  # one mixed batch, each row its own adapter
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }

    def answer(stream=None, base: bool = False) -> list[str]:
        if base:
            with disabled(model):
                return generate(model, tokenizer, prompts, stream=stream, **settings)
        return generate(model, tokenizer, prompts, routes, stream=stream, **settings)

    if args.json:
        answers = answer()
        base_answers = answer(base=True) if args.compare else None
        for i, item in enumerate(items):
            record = {"prompt": item.prompt, "adapter": item.adapter, "answer": answers[i]}
            if base_answers is not None:
                record["base_answer"] = base_answers[i]
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    if len(items) == 1 and not args.compare:  # one answer: the text alone, straight to the terminal
        answer(stream=_print_piece)
        print(flush=True)
        return
    console = make_console()
    board = Board(console, items, ["base model", "answer"] if args.compare else ["answer"])
    with board.live:
        if args.compare:
            answer(stream=board.writer("base model"), base=True)
        answer(stream=board.writer("answer"))
    if not console.is_terminal:  # rich ends the table's last line itself only on a terminal
        console.line()
