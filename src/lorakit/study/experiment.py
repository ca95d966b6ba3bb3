"""`lorakit study`: the notes' claims about fine-tuning and rank, measured on one fine-tuning.

1. The task (lorakit.study.tasks): the demo's digit classifier on transposed digits, or the user's transformers
   classifier on their labelled data; the starting model's metric.
2. Full fine-tuning of the parameter set (everything, or --targets): the reference metric, and what truncating
   each targeted weight to rank k does to it (lorakit.study.truncation).
3. LoRA at ranks 1 … 64 and a second seed of r = 8: metric against trainable parameters, amplification, and the
   subspace similarity of the A matrices (lorakit.study.ranks).
4. Intrinsic dimension, DID and SAID: a sweep over d and d90 (lorakit.study.intrinsic).
5. study.json, PNG plots and report.html in --out (lorakit.study.report).

Every finished training run is kept in --out/points (lorakit.study.points): a study interrupted and started again
with the same settings trains only what it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorakit import __version__
from lorakit.engine.adapter_files import save_adapter
from lorakit.engine.config import LoraConfig
from lorakit.engine.model import find_targets
from lorakit.io.atomic import write_text_atomic
from lorakit.io.console import make_console
from lorakit.io.files import read_json_object
from lorakit.io.lock import exclusive
from lorakit.io.outputs import check_output
from lorakit.study.intrinsic import METHODS, intrinsic_dimension, subspace_parameters
from lorakit.study.points import PointStore
from lorakit.study.ranks import SWEEP_RANKS, lora_targets, train_lora
from lorakit.study.report import write_plots, write_report
from lorakit.study.settings import StudySettings
from lorakit.study.tasks import Task, digits_task, text_task, train_full
from lorakit.study.truncation import truncation_sweep
from lorakit.tools.inspect import compare

__all__ = ["run_study"]

QUICK_STEPS = {"digits": 60, "model": 40}
QUICK_RANKS = (1, 8, 64)
QUICK_GRID = (64, 1024, 16384)  # ×16 apart, and no bisection: d90 to within a factor of 16
PAIRS = {"r8_r64": ((8, 0), (64, 0)), "r8_seeds": ((8, 0), (8, 1))}  # the similarity heatmaps: (rank, seed) pairs
SETTINGS_NAME = "settings.json"


def run_study(settings: StudySettings, console: Console | None = None) -> dict:
    """Runs (or resumes) the whole study, writes its files into `settings.out`, returns study.json's contents.

    Args:
        settings: what to study (see `lorakit study --help`).
        console: where progress and results go (None: stdout).

    Returns:
        Every number of the study, as written to study.json.

    Raises:
        ValueError: data or a model that cannot be read; an --out that holds a study with other settings.
        OSError: an --out that cannot be written.
    """
    console = console or make_console()
    started = time.perf_counter()
    out = settings.out
    # never on, inside or around an input, and writable: before any work (lorakit.io.outputs)
    check_output(out, [("model directory", settings.model), ("data", settings.data), ("eval data", settings.eval_data)])
    with exclusive(out, "--out"):  # one study per --out: a second one is refused at once, naming this one
        return _study(settings, out, console, started)


def _study(settings: StudySettings, out: Path, console: Console, started: float) -> dict:
    """run_study's work, under the lock on `out`."""
    recorded = _recorded_settings(settings)
    _claim(out, recorded)
    say = console.print
    task = _task(settings, console)
    store = PointStore(out / "points")
    names = subspace_parameters(task.model, settings.targets, task.head)
    D = sum(task.model.get_parameter(name).numel() for name in names)
    say(
        f"[bold]1.[/bold] {task.name}: {task.train_examples} training and {task.eval_examples} held-out examples; "
        f"{D:,} of the model's {sum(p.numel() for p in task.model.parameters()):,} parameters are fine-tuned"
    )
    if "base" not in store:
        store["base"] = {"metric": task.evaluate(task.model)}
    base = store["base"]["metric"]
    say(f"   the starting model's accuracy: {base:.2%}")

    # 2. full fine-tuning, and truncation of its weights
    if "full" not in store:
        store["full"] = _full_fine_tuning(task, names, settings.targets, console)
    full = store["full"]
    say(f"[bold]2.[/bold] full fine-tuning of {D:,} parameters: {full['metric']:.2%}")
    _truncation_table(full["truncation"], console)

    # 3. LoRA ranks, similarity, amplification
    ranks = QUICK_RANKS if settings.quick else SWEEP_RANKS
    runs = [(r, 0) for r in ranks] + [(8, 1)]
    lora = {}
    for r, seed in runs:
        key, adapter_dir = f"lora-r{r}-seed{seed}", out / "adapters" / f"r{r}-seed{seed}"
        kept = any((r, seed) in pair for pair in PAIRS.values())
        if key not in store or (kept and not adapter_dir.is_dir()):
            point, model = train_lora(task, r, seed, settings.targets, console)
            if kept:
                save_adapter(model, adapter_dir)
            store[key] = point
        lora[r, seed] = store[key]
        say(
            f"   LoRA r={r}{f' (seed {seed})' if seed else ''}: {lora[r, seed]['metric']:.2%} with "
            f"{lora[r, seed]['trainable']:,} trainable parameters"
        )
    similarity = {
        name: list(compare(out / "adapters" / f"r{a[0]}-seed{a[1]}", out / "adapters" / f"r{b[0]}-seed{b[1]}"))
        for name, (a, b) in PAIRS.items()
    }

    # 4. intrinsic dimension
    intrinsic = {}
    for method in METHODS:
        result = intrinsic_dimension(
            task.model,
            task.loss,
            task.evaluate,
            full["metric"],
            task.recipe,
            method=method,
            targets=settings.targets,
            head=task.head,
            grid=QUICK_GRID if settings.quick else None,
            bisections=0 if settings.quick else 2,
            seed=settings.seed,
            done=store,
            console=console,
        )
        intrinsic[method] = result.as_dict()
        found = "not reached on the grid" if result.d90 is None else f"{result.d90:,}"
        say(f"[bold]4.[/bold] {method.upper()}: d90 = {found} (90% of {full['metric']:.2%} is {result.threshold:.2%})")

    # 5. files
    results = {
        "settings": recorded,
        "task": {
            "name": task.name,
            "train_examples": task.train_examples,
            "eval_examples": task.eval_examples,
            "parameters": sum(p.numel() for p in task.model.parameters()),
            "trained_parameters": D,
            "tensors": len(names),
            "recipe": asdict(task.recipe),
        },
        "base_metric": base,
        "full": full,
        "intrinsic": intrinsic,
        "lora": [lora[r, 0] for r in ranks],
        "lora_second_seed": lora[8, 1],
        "similarity": similarity,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_text_atomic(out / "study.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
    write_plots(results, out)
    write_report(results, out / "report.html")
    say(f"wrote {out / 'report.html'}, {out / 'study.json'} and plots in {out}/")
    return results


def _recorded_settings(settings: StudySettings) -> dict:
    """The settings that decide the study's numbers, as study.json and --out/settings.json keep them: paths
    resolved, data files by their contents' hash, the steps as the task will run them."""
    files = {
        name: {"path": str(Path(path).resolve()), "sha256": _sha256(Path(path))}
        for name, path in (("data", settings.data), ("eval_data", settings.eval_data))
        if path is not None
    }
    return {
        "lorakit": __version__,
        "model": None if settings.model is None else str(Path(settings.model).expanduser().resolve()),
        **files,
        "task": settings.task,
        "text_field": settings.text_field,
        "label_field": settings.label_field,
        "targets": settings.targets,
        "seed": settings.seed,
        "steps": _recorded_steps(settings),
        "quick": settings.quick,
    }


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _claim(out: Path, recorded: dict) -> None:
    """Makes --out this study's: a new one records the settings; one with the same settings resumes; one with
    other settings is refused, naming the differences, so that points of two studies never mix."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    path = out / SETTINGS_NAME
    if path.is_file():
        earlier = read_json_object(path)
        changed = [
            f"{key} {earlier.get(key)!r} → {value!r}" for key, value in recorded.items() if earlier.get(key) != value
        ]
        if changed:
            raise ValueError(
                f"{out} holds a study with other settings ({'; '.join(changed)}): choose another --out, or remove "
                f"{out} to start over"
            )
        return
    write_text_atomic(path, json.dumps(recorded, indent=1) + "\n")


def _task(settings: StudySettings, console: Console) -> Task:
    steps = _recorded_steps(settings)
    if settings.model is None:
        return digits_task(settings.seed, console, steps)
    return text_task(
        settings.model,
        settings.data,
        settings.eval_data,
        settings.text_field,
        settings.label_field,
        settings.seed,
        steps,
    )


def _recorded_steps(settings: StudySettings) -> int | None:
    """--steps, or --quick's where --quick is given without them (None: the task's recipe decides)."""
    if settings.steps is not None or not settings.quick:
        return settings.steps
    return QUICK_STEPS["digits" if settings.model is None else "model"]


def _full_fine_tuning(task: Task, names: list[str], targets: list[str] | str, console: Console) -> dict:
    """Every parameter of the set trained with the recipe: the reference metric, and truncation of its weights."""
    point, model = train_full(task, names, console)
    config = LoraConfig(target_modules=lora_targets(targets), task_type=task.lora_task_type)
    paths = [path for path in find_targets(model, config) if model.get_submodule(path).weight.dim() == 2]
    truncation = truncation_sweep(model, task.evaluate, paths, console=console)
    return {**point, "truncation": {"layers": paths, **truncation}}


def _truncation_table(truncation: dict, console: Console) -> None:
    table = Table(title="Each targeted W replaced by its best rank-k approximation", show_edge=False)
    for column in ("k", "rank kept", "energy kept", "stored (factored)", "accuracy"):
        table.add_column(column, justify="right")
    for kind, text in (("fraction", "{:.0%} of full rank"), ("energy", "{:.0%} of the energy")):
        for row in truncation[kind]:
            cells = (row["rank_kept"], row["energy_kept"], row["stored"], row["metric"])
            table.add_row(text.format(row["level"]), *(f"{value:.1%}" for value in cells))
    console.print(table)
