"""The measured cases, and the worker that runs one of them in a fresh process:

    python -m bench.cases SETTING CASE REPEATS THREADS PROCESS    # prints {"samples": {candidate: [seconds, ...]}}

Each case builds its candidates as deep copies of the setting's base model and times them interleaved
(`timing.interleaved`); `python -m bench` starts the workers and pools their samples. Where a model's
tensors land in memory moves its speed by a point or two (an unchanged deep copy can run that much faster
or slower than the model it copies), so the order in which a worker builds its candidates turns with its
PROCESS number: no candidate is always built first.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from bench.models import SETTINGS, Setting, adamw, device_and_dtype, floor_model, lorakit_model, peft_model
from bench.timing import interleaved

Timings = dict[str, list[float]]  # candidate -> seconds per call, one per round


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Setting, nn.Module, torch.device, int, int], Timings]  # (setting, base, device, repeats, process)
    ratios: dict[str, tuple[str, str]]  # ratio name -> (numerator, denominator) candidates


def built_in_turn(builders: dict[str, Callable[[], nn.Module]], process: int) -> dict[str, nn.Module]:
    """Each candidate's model, built in an order rotated by `process` (see the module's docstring)."""
    names = list(builders)
    turn = process % len(names)
    built = {name: builders[name]() for name in names[turn:] + names[:turn]}
    return {name: built[name] for name in names}


def tokens(setting: Setting, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randint(0, setting.vocab, shape, generator=torch.Generator().manual_seed(1)).to(device)


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}×{shape[1]}"


def trainer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of `model` on the tokens x, as a call."""
    model.train()
    optimizer = adamw(model)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step(setting: Setting, base: nn.Module, device: torch.device, repeats: int, process: int) -> Timings:
    """One AdamW step on batch × length tokens: lorakit, PEFT, and the floor (no weight gradients at all)."""
    x = tokens(setting, setting.batch, device)
    models = built_in_turn(
        {
            "lorakit": lambda: lorakit_model(setting, base),
            "peft": lambda: peft_model(setting, base),
            "floor": lambda: floor_model(base),
        },
        process,
    )
    floor = models["floor"].train()
    embed = floor.get_input_embeddings()

    def floor_step():
        inputs = embed(x).detach().requires_grad_(True)
        floor(inputs_embeds=inputs, labels=x).loss.backward()

    candidates = {
        "lorakit": trainer(models["lorakit"], x),
        "peft": trainer(models["peft"], x),
        "floor": floor_step,
    }
    return interleaved(candidates, repeats)


def dora_training_step(setting: Setting, base: nn.Module, device: torch.device, repeats: int, process: int) -> Timings:
    """One AdamW step on batch × length tokens with a DoRA adapter, lorakit's and PEFT's, beside the same step
    with each library's plain LoRA adapter."""
    x = tokens(setting, setting.batch, device)
    builders = {
        "lorakit dora": lambda: lorakit_model(setting, base, use_dora=True),
        "peft dora": lambda: peft_model(setting, base, use_dora=True),
        "lorakit lora": lambda: lorakit_model(setting, base),
        "peft lora": lambda: peft_model(setting, base),
    }
    models = built_in_turn(builders, process)
    return interleaved({name: trainer(model, x) for name, model in models.items()}, repeats)


def inference(
    setting: Setting,
    base: nn.Module,
    device: torch.device,
    repeats: int,
    process: int,
    shape: tuple[int, int],
    merged: bool,
) -> Timings:
    """A forward pass without gradients: lorakit and PEFT (unmerged or merged) against the base model."""
    import lorakit as lk

    x = tokens(setting, shape, device)
    models = built_in_turn(
        {
            "lorakit": lambda: lorakit_model(setting, base),
            "peft": lambda: peft_model(setting, base),
            "base": lambda: copy.deepcopy(base),
        },
        process,
    )
    ours, theirs, plain = (models[name].eval() for name in ("lorakit", "peft", "base"))
    if merged:
        lk.merge(ours)
        theirs.merge_adapter()

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=x)

        return run

    return interleaved({"lorakit": forward(ours), "peft": forward(theirs), "base": forward(plain)}, repeats)


def mixed_batch(
    setting: Setting, base: nn.Module, device: torch.device, repeats: int, process: int, shape: tuple[int, int]
) -> Timings:
    """`setting.adapters` adapters, one per sample, against the same batch through a single adapter."""
    import lorakit as lk

    x = tokens(setting, shape, device)
    names = ["default", *[f"a{i}" for i in range(1, setting.adapters)]]
    per_sample = [names[i % len(names)] for i in range(shape[0])]
    models = built_in_turn(
        {
            "lorakit": lambda: lorakit_model(setting, base, setting.adapters),
            "peft": lambda: peft_model(setting, base, setting.adapters),
        },
        process,
    )
    ours, theirs = models["lorakit"].eval(), models["peft"].eval()

    def run(fn):
        def call():
            with torch.inference_mode():
                fn()

        return call

    candidates = {
        "lorakit mixed": run(lambda: lk.forward_per_sample(ours, per_sample, input_ids=x)),
        "lorakit single": run(lambda: ours(input_ids=x)),
        "peft mixed": run(lambda: theirs(input_ids=x, adapter_names=per_sample)),
        "peft single": run(lambda: theirs(input_ids=x)),
    }
    return interleaved(candidates, repeats)


def skewed_examples(setting: Setting, rows: int) -> list:
    """Examples with skewed lengths, as many as first-fit decreasing packs into `rows` rows of the setting's
    length: 7 in 8 short (1/32 to 1/8 of a row), 1 in 8 long (half a row to a full one), tokens at random."""
    import random

    from lorakit.training.data import Example
    from lorakit.training.packing import pack_examples

    width, rng = setting.batch[1], random.Random(0)
    examples: list[Example] = []
    while True:
        long = rng.random() < 1 / 8
        n = rng.randint(width // 2, width) if long else rng.randint(max(1, width // 32), max(1, width // 8))
        example = Example([rng.randrange(setting.vocab) for _ in range(n)])
        if len(pack_examples([*examples, example], width)) > rows:
            return examples
        examples.append(example)


def packing(setting: Setting, base: nn.Module, device: torch.device, repeats: int, process: int) -> Timings:
    """One AdamW step over the same skewed examples: packed into batch/2 rows of the setting's length (one
    micro-batch), against one example a row right-padded to the longest of its micro-batch of `batch` rows."""
    from lorakit.training.data import collate
    from lorakit.training.packing import collate_packed, pack_examples

    size, width = setting.batch
    examples = skewed_examples(setting, size // 2)
    rows = pack_examples(examples, width)  # once, as a run packs its dataset once
    dtype = base.get_input_embeddings().weight.dtype  # the packed attention mask's: the model's own
    models = built_in_turn(
        {"packed": lambda: lorakit_model(setting, base), "padded": lambda: lorakit_model(setting, base)}, process
    )

    def trainer(model, batches):
        model.train()
        optimizer = adamw(model)

        def step():
            for batch in batches():
                model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def packed():  # collated in the step, as the trainer does: the packed mask is part of the cost
        return (collate_packed(rows[i : i + size], pad_id=0, dtype=dtype) for i in range(0, len(rows), size))

    def padded():
        return (collate(examples[i : i + size], 0, "causal-lm") for i in range(0, len(examples), size))

    candidates = {"packed": trainer(models["packed"], packed), "padded": trainer(models["padded"], padded)}
    return interleaved(candidates, repeats)


def setting_cases(setting: Setting) -> list[Case]:
    """The timed cases of a setting, in the order BENCHMARKS.md lists them."""
    big, small = setting.batch, setting.small_batch
    against_base = {"lorakit / base": ("lorakit", "base"), "peft / base": ("peft", "base")}
    cases = [
        Case(
            "training step",
            training_step,
            {
                "lorakit / peft": ("lorakit", "peft"),
                "lorakit / floor": ("lorakit", "floor"),
                "peft / floor": ("peft", "floor"),
            },
        ),
        Case(f"unmerged inference {shape_name(big)}", partial(inference, shape=big, merged=False), against_base),
        Case(f"unmerged inference {shape_name(small)}", partial(inference, shape=small, merged=False), against_base),
        Case(f"merged inference {shape_name(big)}", partial(inference, shape=big, merged=True), against_base),
    ]
    mixed_ratios = {
        "lorakit mixed / single": ("lorakit mixed", "lorakit single"),
        "peft mixed / single": ("peft mixed", "peft single"),
    }
    for shape in setting.mixed_batches:
        cases.append(Case(f"mixed adapters {shape_name(shape)}", partial(mixed_batch, shape=shape), mixed_ratios))
    if setting.packing:
        cases.append(Case(f"packing {shape_name(big)}", packing, {"packed / padded": ("packed", "padded")}))
    if setting.dora:
        dora_ratios = {
            "lorakit dora / peft dora": ("lorakit dora", "peft dora"),
            "lorakit dora / lorakit lora": ("lorakit dora", "lorakit lora"),
            "peft dora / peft lora": ("peft dora", "peft lora"),
        }
        cases.append(Case("dora training step", dora_training_step, dora_ratios))
    return cases


def main() -> None:
    setting_name, case_name, repeats, threads, process = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    torch.set_num_threads(threads)
    setting = SETTINGS[setting_name]
    cases = {case.name: case for case in setting_cases(setting)}
    if case_name not in cases:
        sys.exit(f"no case {case_name!r} in {setting_name}; it has: {', '.join(cases)}")
    case = cases[case_name]
    device, dtype = device_and_dtype()
    samples = case.run(setting, setting.build(dtype, device), device, repeats, process)
    print(json.dumps({"samples": samples}))


if __name__ == "__main__":
    main()
