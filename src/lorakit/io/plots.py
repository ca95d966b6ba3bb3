"""The figures of the demo, the CLI and training (matplotlib figures outside pyplot; PNG unless the file name
says .svg or .pdf): singular-value spectra and energy curves, per-digit errors, loss and training curves, and
subspace-similarity heatmaps, each written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorakit import lowrank
from lorakit.io.atomic import atomic_file

__all__ = [
    "error_bars_plot",
    "layer_kinds",
    "loss_plot",
    "save_figure",
    "similarity_heatmaps",
    "spectrum_figure",
    "spectrum_plot",
    "training_plot",
]


def subplots(rows: int = 1, columns: int = 1, **options: Any) -> tuple[Figure, Any]:
    """A figure and its axes, like plt.subplots, but outside pyplot: no backend is chosen or switched for the
    process (a notebook keeps its inline plots), and no figure is left registered anywhere."""
    figure_options = {key: options.pop(key) for key in ("figsize", "layout") if key in options}
    fig = Figure(**figure_options)
    return fig, fig.subplots(rows, columns, **options)


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Writes `fig` at `path` (atomically) in the format its suffix names, PNG without one, and closes it."""
    try:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        if fmt not in fig.canvas.get_supported_filetypes():
            raise ValueError(f"{path}: matplotlib writes no .{fmt} files; name a .png (or .svg, .pdf) file")
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def spectrum_plot(
    spectra: Mapping[str, torch.Tensor], path: str | os.PathLike, energy_fraction: float | None = None
) -> None:
    """Writes `spectrum_figure(spectra, energy_fraction)` at `path`."""
    save_figure(spectrum_figure(spectra, energy_fraction), path)


LINE_STYLES = ("-", "--", ":", "-.")  # after the 10 colours of matplotlib's cycle: 40 kinds told apart


def spectrum_figure(spectra: Mapping[str, torch.Tensor], energy_fraction: float | None = None) -> Figure:
    """Left: singular values (log scale) of each named matrix. Right: their cumulative energy, with a dashed line at
    `energy_fraction`. One colour per kind of layer (`layer_kinds`: q_proj of every block alike), named in a legend
    below the plots, so that dozens of matrices read as a few kinds."""
    kinds = layer_kinds(list(spectra))
    entries = len(kinds) + (energy_fraction is not None)
    longest = max(map(len, kinds), default=1)
    columns = max(1, min(entries, 150 // (longest + 8)))  # about 150 characters of legend fit across at size 8
    rows = -(-entries // columns)
    fig, (ax_s, ax_e) = subplots(1, 2, figsize=(11, 4 + 0.2 * rows), layout="constrained")
    for index, (label, names) in enumerate(kinds.items()):
        style = {"color": f"C{index % 10}", "linestyle": LINE_STYLES[index // 10 % len(LINE_STYLES)]}
        for name in names:
            S = spectra[name].detach().double().cpu()
            curve = lowrank.energy_of_spectrum(S).numpy()
            S = S.numpy()
            k = np.arange(1, S.size + 1)
            positive = S > 0
            shown = label if name == names[0] else "_nolegend_"  # one legend entry per kind
            ax_s.semilogy(k[positive], S[positive], marker="." if S.size < 60 else None, label=shown, **style)
            ax_e.plot(k, curve, **style)
    ax_s.set(title="Singular values", xlabel="index k", ylabel="σ_k")
    ax_e.set(title="Cumulative energy", xlabel="k", ylabel="Σ σ² up to k / ‖M‖²_F", ylim=(0, 1.02))
    if energy_fraction is not None:
        ax_e.axhline(
            energy_fraction, color="grey", linestyle="--", linewidth=1, label=f"{energy_fraction:g} of the energy"
        )
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts singular values
    if kinds:
        fig.legend(loc="outside lower center", ncols=columns, fontsize=8)
    return fig


def layer_kinds(names: Sequence[str]) -> dict[str, list[str]]:
    """{label: names} of the kinds of layer among `names`, in order of appearance: a kind is a name with its layer
    numbers as "*" ("model.layers.*.self_attn.q_proj"), labelled without the dotted start and end that every kind
    shares ("self_attn.q_proj") and with its count ("self_attn.q_proj (×24)")."""
    kinds: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        kinds.setdefault(tuple("*" if part.isdigit() else part for part in name.split(".")), []).append(name)
    start = end = 0
    if len(kinds) > 1:  # what every kind shares, leaving at least one part of the shortest
        shortest = min(map(len, kinds))
        start = min(_shared_start(list(kinds)), shortest - 1)
        end = min(_shared_start([kind[::-1] for kind in kinds]), shortest - 1 - start)
    labelled = {}
    for kind, members in kinds.items():
        label = ".".join(kind[start : len(kind) - end])
        labelled[label if len(members) == 1 else f"{label} (×{len(members)})"] = members
    return labelled


def _shared_start(sequences: list[tuple[str, ...]]) -> int:
    """How many leading parts all `sequences` share."""
    columns = zip(*sequences, strict=False)  # up to the shortest
    return next((i for i, parts in enumerate(columns) if len(set(parts)) > 1), min(map(len, sequences)))


def error_bars_plot(errors: Mapping[str, Sequence[int]], highlight: int, path: str | os.PathLike) -> None:
    """Grouped bars: wrong predictions per class for each named model; the `highlight` class is marked."""
    fig, ax = subplots(figsize=(10, 4))
    classes = range(len(next(iter(errors.values()))))
    width = 0.8 / len(errors)
    for i, (name, counts) in enumerate(errors.items()):
        ax.bar([c + (i - (len(errors) - 1) / 2) * width for c in classes], counts, width, label=name)
    ax.axvspan(highlight - 0.45, highlight + 0.45, color="gold", alpha=0.2, zorder=0)
    ax.set(
        title=f"Wrong test predictions per digit (highlighted: {highlight})",
        xlabel="digit",
        ylabel="errors",
        xticks=list(classes),
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def loss_plot(curves: Mapping[str, Sequence[float]], path: str | os.PathLike) -> None:
    """One panel per named training-loss curve, loss against step (log scale)."""
    fig, axes = subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False, layout="constrained")
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=True):
        ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
        ax.set(title=name, xlabel="step", ylabel="loss")
        if losses and min(losses) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def training_plot(records: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Training loss per step from the records of a metrics.jsonl log (`training.metrics.read_metrics`), with
    eval loss where there is one, and eval perplexity on a right-hand axis where the log has it."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    perplexity = [(r["step"], r["eval_perplexity"]) for r in records if r.get("eval_perplexity") is not None]
    fig, ax = subplots(figsize=(7, 4), layout="constrained")
    lines = []
    if train:
        lines += ax.plot(*zip(*train, strict=True), linewidth=1, label="training loss")
    if evals:
        lines += ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set(title="Fine-tuning", xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    if perplexity:
        right = ax.twinx()
        lines += right.plot(*zip(*perplexity, strict=True), "s--", color="tab:green", label="eval perplexity")
        right.set(ylabel="perplexity", yscale="log")
    ax.legend(handles=lines, labels=[line.get_label() for line in lines])
    save_figure(fig, path)


MAX_HEATMAPS = 16


def similarity_heatmaps(grids: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike) -> None:
    """One φ(i, j) heatmap per layer (the first 16), i down, j across, on a shared 0–1 colour scale."""
    names = list(grids)[:MAX_HEATMAPS]
    columns = min(4, len(names))
    rows = (len(names) + columns - 1) // columns
    fig, axes = subplots(rows, columns, figsize=(3.2 * columns, 3 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names, strict=False):
        grid = np.asarray(grids[name], dtype=float)
        image = ax.imshow(
            grid,
            vmin=0,
            vmax=1,
            cmap="viridis",
            origin="upper",
            extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
        )
        ax.set(title=name if len(name) < 36 else "…" + name[-35:], xlabel="j", ylabel="i")
        ax.title.set_fontsize(8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    save_figure(fig, path)
