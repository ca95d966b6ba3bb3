"""Generating text with a causal language model and its adapters: greedy or sampled, streamed as it comes, and
in mixed batches where each prompt names its own adapter.

    answers = generate(model, tokenizer, ["what colour is the sky"], max_new_tokens=64)
    answers = generate(model, tokenizer, prompts, adapters=["fr", "de", "__base__"])  # one batch, three routes

A prompt is text or a conversation, a list of {"role", "content"} messages. A conversation is rendered with the
tokenizer's chat template and the header of the assistant's reply (add_generation_prompt=True); text is one user
message when the tokenizer has a chat template, and plain text to continue when it has none. The prompts are
left-padded into one batch (the new tokens of every row then start in the same column) and handed to
transformers' `model.generate`; with `adapters`, the whole generation runs inside lorakit.engine.model's
`per_sample`, so that every one of its forward passes routes each row through its own adapter. Generation stops
at the tokenizer's eos and end-of-turn tokens, and an answer is the text of the new tokens before the first of
them, special tokens left out.

Greedy decoding (temperature 0) is deterministic, and a row of a mixed batch gets the same tokens as the prompt
run alone with its adapter active. Sampling draws from torch's generator seeded with `seed` (the caller's random
state is put back afterwards), so a run repeats exactly, but a sampled row depends on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lorakit.engine.model import per_sample
from lorakit.training.chat import check_messages

__all__ = [
    "END_OF_TURN",
    "Prompt",
    "check_settings",
    "generate",
    "generate_ids",
    "has_chat_template",
    "prompt_ids",
    "stop_token_ids",
]

Messages = list[dict[str, str]]
Prompt = str | Messages  # text, or a conversation of {"role", "content"} messages
# the end-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3): generation stops at each one
# the tokenizer has as a token of its own, as well as at its eos
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# -- prompts ----------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template, which makes a text prompt a single user message."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: Prompt, where: str = "prompt") -> list[int]:
    """The tokens a prompt starts generation from.

    Args:
        tokenizer: a transformers tokenizer.
        prompt: a conversation (rendered by the chat template, with the assistant's header for the reply) or
            text (a single user message where the tokenizer has a chat template; plain text, with the tokenizer's
            own special tokens such as bos, where it has none).
        where: what to name in errors.

    Returns:
        The token ids, at least one.

    Raises:
        ValueError: a conversation for a tokenizer without a chat template; bad messages (`check_messages`); a
            prompt that gives no token at all.
    """
    if isinstance(prompt, str) and not has_chat_template(tokenizer):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif not has_chat_template(tokenizer):
            raise ValueError(f"{where}: messages need a chat template, and the tokenizer has none")
        else:
            messages = check_messages(prompt, where)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote bos and the like
    if not ids:
        raise ValueError(f"{where}: the prompt is empty (no tokens)")
    return ids


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the model's eos (generation config), the tokenizer's eos and each END_OF_TURN
    marker the tokenizer has as a token of its own.

    Args:
        model: a transformers causal language model.
        tokenizer: its tokenizer.

    Returns:
        The token ids, without repeats.

    Raises:
        ValueError: neither the model nor the tokenizer names an eos or end-of-turn token.
    """
    found: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += config_eos if isinstance(config_eos, list) else [config_eos]
    found.append(tokenizer.eos_token_id)
    added = tokenizer.get_added_vocab()  # the tokenizer's own special and added tokens: {text: id}
    found += [added[marker] for marker in END_OF_TURN if marker in added]
    stops = list(dict.fromkeys(t for t in found if isinstance(t, int)))
    if not stops:
        raise ValueError("neither the model nor its tokenizer has an eos or end-of-turn token to stop at")
    return stops


# -- generating -------------------------------------------------------------------------------------------------


def check_settings(max_new_tokens: int, temperature: float, top_p: float, as_flags: bool = False) -> None:
    """Refuses settings generation cannot run with.

    Args:
        max_new_tokens: at least 1.
        temperature: 0 (greedy) or more.
        top_p: in (0, 1].
        as_flags: name them as the command's flags (--max-new-tokens) rather than as arguments.

    Raises:
        ValueError: a setting out of its range, naming it.
    """

    def name(argument: str) -> str:
        return "--" + argument.replace("_", "-") if as_flags else argument

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{name('max_new_tokens')} must be an integer of at least 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{name('temperature')} must be 0 (greedy) or more, got {temperature!r}")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")


class TextStream:
    """A streamer for `model.generate`: decodes each row's new tokens as they arrive and calls `callback(row,
    text)` with the text added since its last call, up to the row's first stop token. A word is held back until
    the next space or newline (as transformers' TextStreamer does), since the tokens that follow can change how
    it decodes; `end` hands over the rest, so that a row's pieces add up to its decoded answer."""

    def __init__(self, tokenizer: Any, stops: list[int], callback: Callable[[int, str], None]):
        self.tokenizer = tokenizer
        self.stops = set(stops)
        self.callback = callback
        self.tokens: list[list[int]] | None = None  # per row, the new tokens so far
        self.stopped: list[bool] = []
        self.shown: list[int] = []  # per row, how many characters of its decoded text were handed over

    def put(self, value: torch.Tensor) -> None:
        if self.tokens is None:  # generate hands over the prompts first, (batch, L)
            rows = value.shape[0] if value.dim() > 1 else 1
            self.tokens, self.stopped, self.shown = [[] for _ in range(rows)], [False] * rows, [0] * rows
            return
        for row, token in enumerate(value.reshape(-1).tolist()):  # (batch,): one new token per row
            if self.stopped[row]:
                continue
            if token in self.stops:
                self.stopped[row] = True
                self.show(row, final=True)
            else:
                self.tokens[row].append(token)
                self.show(row, final=False)

    def end(self) -> None:
        for row in range(len(self.tokens or [])):
            if not self.stopped[row]:
                self.show(row, final=True)

    def show(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and not text.endswith("\n"):
            text = text[: text.rfind(" ") + 1]  # up to the last space: the word after it may still change
        if len(text) > self.shown[row]:
            self.callback(row, text[self.shown[row] :])
            self.shown[row] = len(text)


def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    adapters: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stream: Callable[[int, str], None] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt's answer, all prompts in one left-padded batch (see the module docstring).

    Args:
        model: a transformers causal language model, with or without adapters.
        tokenizer: its tokenizer; its padding side does not matter (the batch is padded here, on the left).
        prompts: text or conversations (`prompt_ids` says how each becomes tokens).
        adapters: None: the model as it is (its active adapters; inside `lk.disabled(model)`, the base). Else one
            adapter name per prompt, "__base__" for none: one mixed batch through `per_sample`.
        max_new_tokens: the most tokens an answer gets.
        temperature: 0 decodes greedily; more samples from the softmax at that temperature.
        top_p: when sampling, draw only from the smallest set of tokens holding this much probability (1: all).
        seed: seeds the sampling; the caller's random state is left as it was.
        stream: called as `stream(i, text)` with the text prompt i's answer grows by, as it is generated.

    Returns:
        For each prompt, its new token ids before the first stop token (`stop_token_ids`), which is left out.

    Raises:
        ValueError: bad settings (`check_settings`) or prompts (`prompt_ids`); no prompts; `adapters` not one per
            prompt, or naming an adapter the model does not have.
        RuntimeError: adapters merged into the base weights with `adapters` given (`lk.unmerge` first).
    """
    check_settings(max_new_tokens, temperature, top_p)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:  # what torch's generator takes
        raise ValueError(f"the seed must be an integer in [0, 2**64), got {str(seed)[:40]}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"got {len(adapters)} adapter names for {len(prompts)} prompts: give one per prompt")
    encoded = [prompt_ids(tokenizer, prompt, f"prompt {i}") for i, prompt in enumerate(prompts)]
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (batch, width), padded on the left
    attention_mask = torch.zeros_like(input_ids)  # (batch, width): 0 over the padding
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    settings: dict[str, Any] = {"do_sample": False}
    if temperature > 0:  # top_k=0: no top-k cut besides top_p (transformers' default would keep the top 50)
        settings = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    streamer = TextStream(tokenizer, stops, stream) if stream is not None else None
    routing = per_sample(model, list(adapters)) if adapters is not None else nullcontext()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with routing, torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
            streamer=streamer,
            **settings,
        )  # (batch, width + new): finished rows are padded to the longest
    answers = []
    for row in out[:, width:].tolist():
        ends = [k for k, token in enumerate(row) if token in stops]
        answers.append(row[: ends[0]] if ends else row)
    return answers


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    adapters: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stream: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Each prompt's answer as text, without the prompt and without special tokens.

    Args:
        model: a transformers causal language model, with or without adapters.
        tokenizer: its tokenizer.
        prompts: text or conversations of {"role", "content"} messages. Text is a single user message where the
            tokenizer has a chat template, plain text to continue where it has none.
        adapters: None: the model as it is. Else one adapter name per prompt ("__base__" for none), run as one
            mixed batch: greedy answers are those of each prompt alone with its adapter active.
        max_new_tokens: the most tokens an answer gets; it ends earlier at an eos or end-of-turn token.
        temperature: 0 (the default) decodes greedily; more samples.
        top_p: nucleus sampling's probability mass, in (0, 1]; used only when sampling.
        seed: seeds the sampling (the caller's random state is left alone).
        stream: called as `stream(i, text)` as prompt i's answer grows; the pieces add up to the answer.

    Returns:
        One answer per prompt, in order.

    Raises:
        ValueError: bad settings, prompts or adapter names (see `generate_ids`).
        RuntimeError: adapters merged into the base weights with `adapters` given.
    """
    ids = generate_ids(model, tokenizer, prompts, adapters, max_new_tokens, temperature, top_p, seed, stream)
    return [tokenizer.decode(answer, skip_special_tokens=True) for answer in ids]
