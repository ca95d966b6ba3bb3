"""`lorakit demo`: the LoRA notes' experiment, run for real, plus what the notes leave out.

1. scikit-learn's bundled handwritten digits (1,797 8×8 images), split 70/30, stratified.
2. A deliberately oversized MLP, 64 → 1000 → 2000 → 10, trained to good but not perfect.
3. The digit it gets wrong most often gets a rank-1 LoRA on all three Linear weights, base frozen.
4. Fine-tuning on that digit alone: it improves; switching LoRA off gives the original network back, bit
   for bit.
5. Past the notes: training on one class makes the network predict it everywhere (forgetting), and a
   second adapter trained with a small replay sample of the other digits fixes that; the low-rank view
   of the base weights and of the learned updates; merging; the adapter's size on disk.
6. metrics.json, PNG plots and report.html in the output directory.
"""

from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import lorakit as lk
from lorakit import lowrank
from lorakit.demo.report import low_rank_table, write_report
from lorakit.demo.settings import DemoSettings
from lorakit.io.atomic import atomic_file, write_text_atomic
from lorakit.io.console import make_console, make_progress
from lorakit.io.files import write_safetensors
from lorakit.io.outputs import check_output
from lorakit.io.plots import error_bars_plot, loss_plot, spectrum_plot
from lorakit.io.untrusted import check_memory

__all__ = ["run_demo"]

LAYERS = ("linear1", "linear2", "linear3")
BATCH = 16
LR = 1e-3
REPLAY_PER_DIGIT = 25  # the replay sample: this many training images of each other digit


@dataclass
class Digits:
    x_train: torch.Tensor  # (n_train, 64), pixel values scaled to [0, 1]
    y_train: torch.Tensor  # (n_train,)
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int) -> Digits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ValueError("lorakit demo needs scikit-learn: pip install 'lorakit[demo]'") from None
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, test_size=0.3, stratify=labels, random_state=seed
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Digits(as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test))


def oversized_mlp() -> nn.Sequential:
    """The notes' network with an 8×8 input: about 2.1 million weights for 1,257 training images."""
    return nn.Sequential(
        OrderedDict(
            linear1=nn.Linear(64, 1000),
            relu1=nn.ReLU(),
            linear2=nn.Linear(1000, 2000),
            relu2=nn.ReLU(),
            linear3=nn.Linear(2000, 10),
        )
    )


def train(
    model: nn.Module,
    x: torch.Tensor,  # (n, 64)
    y: torch.Tensor,  # (n,)
    steps: int,
    generator: torch.Generator,
    console: Console,
    label: str,
) -> list[float]:
    """`steps` AdamW steps on random batches of (x, y), with a progress bar; returns each step's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    with make_progress(console) as progress:
        task = progress.add_task(label, total=steps)
        for _ in range(steps):
            batch = torch.randint(0, len(x), (BATCH,), generator=generator)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"{label} loss {loss.item():.3f}")
    model.eval()
    return losses


def evaluate(model: nn.Module, data: Digits) -> tuple[list[int], float, torch.Tensor]:
    """Wrong predictions per digit, accuracy, and the test logits."""
    with torch.no_grad():
        logits = model(data.x_test)
    predicted = logits.argmax(1)
    wrong = predicted != data.y_test
    errors = [int((wrong & (data.y_test == digit)).sum()) for digit in range(10)]
    return errors, float((~wrong).float().mean()), logits


def parameter_table(model: nn.Module, console: Console) -> tuple[int, int]:
    """Prints each layer's W, b, A and B shapes; returns (original parameters, LoRA parameters)."""
    table = Table(title="Parameters", show_edge=False)
    for column in ("layer", "W", "b", "A", "B", "original", "LoRA"):
        table.add_column(column, justify="right")
    original_total = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
    lora_total = 0
    for name in LAYERS:
        layer = getattr(model, name)
        W, b = layer.base.weight, layer.base.bias
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        lora_total += A.numel() + B.numel()
        shape = lambda t: " × ".join(map(str, t.shape))  # noqa: E731
        table.add_row(
            name, shape(W), shape(b), shape(A), shape(B), f"{W.numel() + b.numel():,}", f"{A.numel() + B.numel():,}"
        )
    table.add_row("total", "", "", "", "", f"{original_total:,}", f"{lora_total:,}", style="bold")
    console.print(table)
    console.print(f"LoRA adds {lora_total:,} parameters: {100 * lora_total / original_total:.3f}% of the original")
    return original_total, lora_total


def error_table(console: Console, rows: dict[str, tuple[list[int], float]], worst: int) -> None:
    table = Table(title=f"Wrong predictions per digit (worst digit: {worst})", show_edge=False)
    table.add_column("model")
    for digit in range(10):
        table.add_column(f"[bold]{digit}[/bold]" if digit == worst else str(digit), justify="right")
    table.add_column("accuracy", justify="right")
    for name, (errors, accuracy) in rows.items():
        table.add_row(name, *map(str, errors), f"{accuracy:.2%}")
    console.print(table)


def low_rank_view(model: nn.Module, rank: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The spectrum of each frozen base weight and the rank of each learned update ΔW = s·B A: a row of
    figures per layer, and the singular values of each base weight."""
    rows, spectra = [], {}
    for name in LAYERS:
        layer = getattr(model, name)
        W = layer.base.weight.detach().double()
        S = spectra[name] = lowrank.singular_values(W)  # one SVD serves every figure of the row
        # in the dtype it was computed in: in float64 its float32 round-off would count as extra rank
        delta = layer.delta_weight("default").detach()
        rows.append(
            {
                "layer": name,
                "shape": list(W.shape),
                "rank": lowrank.rank_of_spectrum(S, tuple(W.shape)),
                "effective_rank": round(lowrank.effective_rank_of_spectrum(S), 2),
                "rank_for_90_energy": lowrank.rank_for_energy_of_spectrum(S, 0.9),
                # a rank past the weight's smaller side keeps all of its energy
                f"energy_top_{rank}": round(float(lowrank.energy_of_spectrum(S)[min(rank, len(S)) - 1]), 4),
                "delta_rank": lowrank.rank(delta),
                "delta_norm": float(torch.linalg.matrix_norm(delta)),
            }
        )
    return rows, spectra


def peak_adapter_bytes(rank: int) -> int:
    """About the most memory the demo's adapters of rank `rank` take at once, 52 bytes per parameter of one
    adapter (r · (in + out) per layer): both adapters in float32 (8), the gradient and AdamW's two moments of the
    one that trains (12), and the float64 copies of the adapted model that the merge check makes (32)."""
    sizes = [
        (layer.in_features, layer.out_features) for layer in oversized_mlp().children() if isinstance(layer, nn.Linear)
    ]
    return 52 * rank * sum(fan_in + fan_out for fan_in, fan_out in sizes)


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict:
    """Runs the whole experiment, writes its files into `settings.out`, returns the metrics."""
    console = console or make_console()
    started = time.perf_counter()
    out = check_output(settings.out, [])  # before any work: a place the files can go
    check_memory(peak_adapter_bytes(settings.rank), f"lorakit demo --rank {settings.rank}")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    say = console.print
    # 1-2. data and an oversized network, trained to good but not perfect
    data = load_digits_split(settings.seed)
    say(f"[bold]1.[/bold] digits: {len(data.x_train)} training and {len(data.x_test)} test images of 8×8 pixels")
    model = oversized_mlp()
    base_steps = settings.base_epochs * len(data.x_train) // BATCH
    base_losses = train(model, data.x_train, data.y_train, base_steps, generator, console, "base model")
    errors_before, accuracy_before, logits_before = evaluate(model, data)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    worst = max(range(10), key=lambda d: (errors_before[d], -d))
    say(
        f"[bold]2.[/bold] the oversized MLP reaches {accuracy_before:.2%} test accuracy; digit {worst} is wrong "
        f"most often ({errors_before[worst]} times)"
    )

    # 3. rank-r LoRA on every Linear weight, base frozen
    config = lk.LoraConfig(r=settings.rank, alpha=settings.alpha, target_modules=list(LAYERS))
    lk.inject(model, config)
    say(f"[bold]3.[/bold] LoRA of rank {settings.rank}, α {settings.alpha:g} on {', '.join(LAYERS)}")
    params_original, params_lora = parameter_table(model, console)

    # 4. fine-tune on the worst digit alone
    only_worst = data.y_train == worst
    lora_losses = train(
        model,
        data.x_train[only_worst],
        data.y_train[only_worst],
        settings.steps,
        generator,
        console,
        f"LoRA on digit {worst}",
    )
    errors_lora, accuracy_lora, logits_lora = evaluate(model, data)
    with lk.disabled(model):
        errors_disabled, accuracy_disabled, logits_disabled = evaluate(model, data)
        base_weights_equal = all(
            torch.equal(getattr(model, name).base.weight, original_state[f"{name}.weight"])
            and torch.equal(getattr(model, name).base.bias, original_state[f"{name}.bias"])
            for name in LAYERS
        )
    disabled_equals_original = base_weights_equal and torch.equal(logits_disabled, logits_before)
    say(
        f"[bold]4.[/bold] with LoRA on, digit {worst} is wrong {errors_lora[worst]} times (was "
        f"{errors_before[worst]}); with LoRA off the weights and test logits equal the original bit for bit: "
        f"{disabled_equals_original}"
    )

    # 5a. forgetting, and a second adapter trained with replay
    others = torch.cat([torch.nonzero(data.y_train == d).flatten()[:REPLAY_PER_DIGIT] for d in range(10) if d != worst])
    replay = torch.cat([torch.nonzero(only_worst).flatten(), others])
    lk.inject(model, config, adapter="replay")  # now the active adapter; "default" stays as it was
    replay_losses = train(
        model,
        data.x_train[replay],
        data.y_train[replay],
        settings.steps,
        generator,
        console,
        f"LoRA on digit {worst} + replay",
    )
    errors_replay, accuracy_replay, _ = evaluate(model, data)
    lk.set_adapter(model, "default")
    say(
        f"[bold]5.[/bold] forgetting: one-digit fine-tuning moves overall accuracy {accuracy_before:.2%} → "
        f"{accuracy_lora:.2%}; with a replay of {len(others)} other images it is {accuracy_replay:.2%} and digit "
        f"{worst} is wrong {errors_replay[worst]} times"
    )
    evaluations = {  # model -> (errors per digit, accuracy)
        "before": (errors_before, accuracy_before),
        "LoRA on": (errors_lora, accuracy_lora),
        "LoRA off": (errors_disabled, accuracy_disabled),
        "LoRA + replay": (errors_replay, accuracy_replay),
    }
    error_table(console, evaluations, worst)

    # 5b. the low-rank view
    layer_rows, singular_values = low_rank_view(model, settings.rank)
    table = Table(title="Low-rank view", show_edge=False)
    headings, rows = low_rank_table(layer_rows, settings.rank)
    for column in headings:
        table.add_column(column, justify="right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)

    # 5c. merging, and the adapter on disk. Merged and unmerged compute the same function; in float32 they
    # differ by round-off of the size of the logits' ulp, so the equality is measured in float64 as well.
    merged_diff = {}
    for dtype in (torch.float64, torch.float32):
        unmerged = copy.deepcopy(model).to(dtype)
        merged = copy.deepcopy(unmerged)
        lk.merge(merged, safe=True)
        with torch.no_grad():
            x = data.x_test.to(dtype)
            merged_diff[dtype] = float((merged(x) - unmerged(x)).abs().max())
    merged_max_abs_diff = merged_diff[torch.float64]
    adapter_dir = lk.save_adapter(model, out / "adapter", adapter="default")
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())
    with atomic_file(out / "base_model.safetensors") as tmp:
        write_safetensors(original_state, tmp)
    base_bytes = (out / "base_model.safetensors").stat().st_size
    say(
        f"merged outputs differ from unmerged by at most {merged_max_abs_diff:.1e} in float64 "
        f"({merged_diff[torch.float32]:.1e} in float32 round-off); the adapter takes "
        f"{adapter_bytes:,} bytes on disk, the base model {base_bytes:,}"
    )

    # 6. files
    metrics = {
        "seed": settings.seed,
        "rank": settings.rank,
        "alpha": settings.alpha,
        "steps": settings.steps,
        "worst_digit": worst,
        "errors_before": errors_before,
        "errors_lora": errors_lora,
        "errors_disabled": errors_disabled,
        "errors_replay": errors_replay,
        "accuracy_before": accuracy_before,
        "accuracy_lora": accuracy_lora,
        "accuracy_disabled": accuracy_disabled,
        "accuracy_replay": accuracy_replay,
        "params_original": params_original,
        "params_lora": params_lora,
        "delta_ranks": [row["delta_rank"] for row in layer_rows],
        "disabled_equals_original": disabled_equals_original,
        "merged_max_abs_diff": merged_max_abs_diff,
        "merged_max_abs_diff_float32": merged_diff[torch.float32],
        "max_abs_logit": float(logits_lora.abs().max()),
        "adapter_bytes": adapter_bytes,
        "base_model_bytes": base_bytes,
        "replay_images": len(others),
        "layers": layer_rows,
    }
    error_bars_plot({name: errors for name, (errors, _) in evaluations.items()}, worst, out / "errors.png")
    spectrum_plot(singular_values, out / "spectra.png", energy_fraction=0.9)
    loss_plot(
        {
            "base model": base_losses,
            f"LoRA, digit {worst}": lora_losses,
            f"LoRA, digit {worst} + replay": replay_losses,
        },
        out / "losses.png",
    )
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(out / "report.html", metrics)
    say(f"wrote {out / 'report.html'}, {out / 'metrics.json'} and plots in {out}/")
    return metrics
