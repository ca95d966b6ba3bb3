"""The measured cases. Each returns `timing.summary`: medians, ratios of medians and their intervals."""

from __future__ import annotations

import torch

from bench.models import Setting, adamw, floor_model, lorakit_model, peft_model
from bench.timing import interleaved, summary


def tokens(setting: Setting, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randint(0, setting.vocab, shape, generator=torch.Generator().manual_seed(1)).to(device)


def training_step(setting: Setting, base, device, repeats: int) -> dict:
    """One AdamW step on batch × length tokens: lorakit, PEFT, and the floor (no weight gradients at all)."""
    x = tokens(setting, setting.batch, device)

    def trainer(model):
        model.train()
        optimizer = adamw(model)

        def step():
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    floor = floor_model(base).train()
    embed = floor.get_input_embeddings()

    def floor_step():
        inputs = embed(x).detach().requires_grad_(True)
        floor(inputs_embeds=inputs, labels=x).loss.backward()

    samples = interleaved(
        {
            "lorakit": trainer(lorakit_model(setting, base)),
            "peft": trainer(peft_model(setting, base)),
            "floor": floor_step,
        },
        repeats,
    )
    return summary(
        samples,
        {
            "lorakit / peft": ("lorakit", "peft"),
            "lorakit / floor": ("lorakit", "floor"),
            "peft / floor": ("peft", "floor"),
        },
    )


def inference(setting: Setting, base, device, repeats: int, shape: tuple[int, int], merged: bool) -> dict:
    """A forward pass without gradients: lorakit and PEFT (unmerged or merged) against the base model."""
    import lorakit as lk

    x = tokens(setting, shape, device)
    ours, theirs = lorakit_model(setting, base).eval(), peft_model(setting, base).eval()
    if merged:
        lk.merge(ours)
        theirs.merge_adapter()

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=x)

        return run

    samples = interleaved({"lorakit": forward(ours), "peft": forward(theirs), "base": forward(base)}, repeats)
    return summary(samples, {"lorakit / base": ("lorakit", "base"), "peft / base": ("peft", "base")})


def mixed_batch(setting: Setting, base, device, repeats: int, shape: tuple[int, int]) -> dict:
    """`setting.adapters` adapters, one per sample, against the same batch through a single adapter."""
    import lorakit as lk

    x = tokens(setting, shape, device)
    names = ["default", *[f"a{i}" for i in range(1, setting.adapters)]]
    per_sample = [names[i % len(names)] for i in range(shape[0])]
    ours = lorakit_model(setting, base, setting.adapters).eval()
    theirs = peft_model(setting, base, setting.adapters).eval()

    def run(fn):
        def call():
            with torch.inference_mode():
                fn()

        return call

    samples = interleaved(
        {
            "lorakit mixed": run(lambda: lk.forward_per_sample(ours, per_sample, input_ids=x)),
            "lorakit single": run(lambda: ours(input_ids=x)),
            "peft mixed": run(lambda: theirs(input_ids=x, adapter_names=per_sample)),
            "peft single": run(lambda: theirs(input_ids=x)),
        },
        repeats,
    )
    return summary(
        samples,
        {
            "lorakit mixed / single": ("lorakit mixed", "lorakit single"),
            "peft mixed / single": ("peft mixed", "peft single"),
        },
    )
