"""PNG plots (matplotlib, Agg backend): spectra and energy curves, written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lorakit.atomic import atomic_file

__all__ = ["save_figure", "spectrum_plot"]


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> None:
    """Writes `fig` as a PNG at `path` (atomically) and closes it."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def spectrum_plot(
    spectra: Mapping[str, torch.Tensor], path: str | os.PathLike, energy_fraction: float | None = None
) -> None:
    """Left: singular values (log scale) of each named matrix. Right: their cumulative energy."""
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for name, S in spectra.items():
        S = S.detach().double().cpu()
        k = torch.arange(1, S.numel() + 1)
        positive = S > 0
        ax_s.semilogy(k[positive], S[positive], marker="." if S.numel() < 60 else None, label=name)
        squares = S.square()
        curve = squares.cumsum(0) / squares.sum() if squares.sum() > 0 else torch.ones_like(S)
        ax_e.plot(k, curve, label=name)
    ax_s.set(title="Singular values", xlabel="index k", ylabel="σ_k")
    ax_e.set(title="Cumulative energy", xlabel="k", ylabel="Σ σ² up to k / ‖M‖²_F", ylim=(0, 1.02))
    if energy_fraction is not None:
        ax_e.axhline(energy_fraction, color="grey", linestyle="--", linewidth=1, label=f"{energy_fraction:g}")
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
    if len(spectra) <= 12:
        ax_e.legend(fontsize=8)
    save_figure(fig, path)
