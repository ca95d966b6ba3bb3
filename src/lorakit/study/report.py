"""The study's figures and report.html: each section says in a few sentences what was measured and what it shows,
for a reader who has just read the notes on rank, the SVD and LoRA. The page needs nothing but the PNG files beside
it (no scripts, no network).

Figures (PNG, in --out): parameters.png (metric against trained parameters: subspaces DID and SAID, LoRA ranks,
full fine-tuning), similarity.png (φ(i, j) heatmaps, the LoRA paper's figures 3 and 4), amplification.png (its
table 7 against the rank) and truncation.png (the metric against the rank and energy kept).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from statistics import median

import numpy as np

from lorakit.demo.report import STYLE, html_image, html_table
from lorakit.io.atomic import write_text_atomic
from lorakit.io.plots import save_figure, subplots

__all__ = ["write_plots", "write_report"]

HEATMAP_LAYERS = 4  # layers shown in similarity.png, evenly spread over the model
WIDE_TABLES = "table { display: block; max-width: 100%; overflow-x: auto; }"  # a wide table scrolls, not the page


# -- figures -----------------------------------------------------------------------------------------------


def write_plots(results: dict, out: str | os.PathLike) -> None:
    """Writes parameters.png, similarity.png, amplification.png and truncation.png into `out`."""
    out = Path(out)
    parameters_plot(results, out / "parameters.png")
    similarity_plot(results["similarity"], out / "similarity.png")
    amplification_plot(results["lora"], out / "amplification.png")
    truncation_plot(results, out / "truncation.png")


def parameters_plot(results: dict, path: Path) -> None:
    """Accuracy against trained parameters (log scale): DID and SAID at each d, LoRA at each rank, full
    fine-tuning, with the 90% threshold, the starting model and each d90."""
    fig, ax = subplots(figsize=(9, 5), layout="constrained")
    full = results["full"]
    for method, marker in (("did", "o"), ("said", "s")):
        result = results["intrinsic"][method]
        trained = [p for p in result["points"] if p["d"] > 0]
        ax.plot(
            [p["d"] for p in trained],
            [p["metric"] for p in trained],
            marker=marker,
            label=f"subspace, {method.upper()}",
        )
        if result["d90"]:
            ax.axvline(result["d90"], color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
    lora = results["lora"]
    ax.plot([p["trainable"] for p in lora], [p["metric"] for p in lora], marker="^", label="LoRA, r = 1 … 64")
    for p in lora:
        ax.annotate(
            f"r={p['r']}", (p["trainable"], p["metric"]), textcoords="offset points", xytext=(3, -10), fontsize=7
        )
    ax.plot([full["trainable"]], [full["metric"]], marker="*", markersize=12, linestyle="", label="full fine-tuning")
    threshold = results["intrinsic"]["did"]["threshold"]
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="90% of full fine-tuning")
    ax.axhline(results["base_metric"], color="grey", linestyle=":", linewidth=1, label="the starting model")
    ax.set(xscale="log", xlabel="trained parameters (d for a subspace)", ylabel="held-out accuracy", ylim=(0, 1.02))
    ax.set_title("How many parameters does this fine-tuning need? (dotted verticals: d90)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def shown_layers(layers: list[str]) -> list[int]:
    """The indices of up to HEATMAP_LAYERS layers, evenly spread from the first to the last."""
    if len(layers) <= HEATMAP_LAYERS:
        return list(range(len(layers)))
    return sorted({round(i * (len(layers) - 1) / (HEATMAP_LAYERS - 1)) for i in range(HEATMAP_LAYERS)})


def similarity_plot(similarity: dict, path: Path) -> None:
    """φ(i, j) for a few layers: the top row r = 8 against r = 64 (i ≤ 8, j ≤ 64), the bottom row two seeds of
    r = 8, on one 0–1 colour scale."""
    rows = (("r8_r64", "r = 8 (i) against r = 64 (j)"), ("r8_seeds", "r = 8, seed 0 (i) against seed 1 (j)"))
    first = similarity[rows[0][0]]
    picked = shown_layers([entry["layer"] for entry in first])
    fig, axes = subplots(2, len(picked), figsize=(3.4 * len(picked), 5.5), squeeze=False, layout="constrained")
    image = None
    for row, (key, title) in enumerate(rows):
        for column, index in enumerate(picked):
            entry, ax = similarity[key][index], axes[row][column]
            grid = np.asarray(entry["phi"], dtype=float)
            image = ax.imshow(
                grid,
                vmin=0,
                vmax=1,
                cmap="viridis",
                aspect="auto",
                extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
            )
            name = entry["layer"]
            ax.set_title(("…" + name[-30:] if len(name) > 31 else name) + f"\n{title}", fontsize=7)
            ax.set(xlabel="j", ylabel="i")
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    save_figure(fig, path)


def amplification_rows(lora: list[dict]) -> list[dict]:
    """Per rank, the median over layers of each figure of the LoRA paper's table 7."""
    keys = ("delta_norm", "weight_norm", "delta_directions", "weight_directions", "random_directions")
    rows = []
    for point in lora:
        layers = point["amplification"]
        row = {"r": point["r"], **{key: median(layer[key] for layer in layers) for key in keys}}
        for key in ("amplification", "random_amplification"):
            values = [layer[key] for layer in layers if layer[key] is not None]
            row[key] = median(values) if values else None
        rows.append(row)
    return rows


def amplification_plot(lora: list[dict], path: Path) -> None:
    """Left: ‖Uᵀ W V‖_F for ΔW's, W's own and random top-r directions against r. Right: ‖ΔW‖_F over the first
    and over the last (medians over layers)."""
    rows = amplification_rows(lora)
    ranks = [row["r"] for row in rows]
    fig, (left, right) = subplots(1, 2, figsize=(11, 4), layout="constrained")
    for key, label in (
        ("weight_directions", "W's own top-r directions"),
        ("delta_directions", "ΔW's top-r directions"),
        ("random_directions", "random r directions"),
    ):
        left.plot(ranks, [row[key] for row in rows], marker="o", label=label)
    left.set(title="‖Uᵀ W V‖_F: how much of W lies in r directions", xlabel="LoRA rank r", ylabel="median over layers")
    right.plot(ranks, [row["amplification"] for row in rows], marker="o", label="‖ΔW‖ / ‖Uᵀ W V‖, ΔW's directions")
    right.plot(ranks, [row["random_amplification"] for row in rows], marker="s", label="‖ΔW‖ / ‖Uᵀ W V‖, random ones")
    right.set(title="Amplification factor", xlabel="LoRA rank r", ylabel="median over layers")
    for ax in (left, right):
        ax.set(xscale="log", yscale="log")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def truncation_plot(results: dict, path: Path) -> None:
    """The fine-tuned model's accuracy with every targeted W cut to rank k: against the fraction of full rank kept
    (left) and the energy kept (right)."""
    truncation = results["full"]["truncation"]
    fig, axes = subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, kind, xlabel in (
        (axes[0], "fraction", "k as a fraction of each W's full rank"),
        (axes[1], "energy", "share of each W's energy Σσ² kept"),
    ):
        rows = truncation[kind]
        ax.plot([row["level"] for row in rows], [row["metric"] for row in rows], marker="o", label="rank-k weights")
        ax.axhline(results["full"]["metric"], color="grey", linestyle="--", linewidth=1, label="full rank")
        ax.axhline(results["base_metric"], color="grey", linestyle=":", linewidth=1, label="the starting model")
        ax.set(xlabel=xlabel, ylabel="held-out accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_xscale("log")
    axes[0].set_title("Truncated to a fraction of full rank")
    axes[1].set_title("Truncated to keep a share of the energy")
    save_figure(fig, path)


# -- the page ----------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _d90_sentence(result: dict) -> str:
    if result["d90"] is None:
        return f"no d of the grid (up to {max(p['d'] for p in result['points']):,}) reached the threshold"
    if result["d90"] == 0:
        return "the starting model reaches the threshold without training (d90 = 0)"
    low = result["bracket"][0]
    share = result["d90"] / result["D"]
    parameters = f"{share:.2g} of the {result['D']:,} parameters"
    return f"d90 = {result['d90']:,}, {parameters} (the largest d below it that failed: {low:,})"


def _truncation_sentence(truncation: dict, threshold: float, did: dict) -> str:
    """What keeping 90% of full fine-tuning's accuracy takes when the weights are truncated, beside d90, from the
    measurements (the page states what was measured, whichever way it comes out)."""
    enough = [row for row in truncation["fraction"] if row["metric"] >= threshold]
    if not enough:
        kept = "No truncation of the sweep keeps 90% of full fine-tuning's accuracy"
    else:
        row = min(enough, key=lambda row: row["level"])
        kept = (
            f"The smallest truncation of the sweep that keeps 90% of full fine-tuning's accuracy keeps "
            f"{row['level']:.0%} of each weight's full rank and {row['energy_kept']:.1%} of its energy; its factors "
            f"would store {row['stored']:.0%} of the dense weights"
        )
    if not did["d90"]:
        return kept + "."
    return (
        f"{kept}. For comparison, the fine-tuning itself needed d90 = {did['d90']:,} free parameters, "
        f"{did['d90'] / did['D']:.2g} of the {did['D']:,} it moves: how far the weights can be cut depends on the "
        "task and is measured here, while the update's small dimension is what LoRA relies on."
    )


def _similarity_summary(similarity: dict) -> list[list[str]]:
    """φ at a few (i, j) per pair, as the mean over layers, beside what random subspaces would give (max(i, j)/n)."""
    rows = []
    for key, pair, cells in (
        ("r8_r64", "r = 8 against r = 64", ((1, 1), (8, 8), (8, 64))),
        ("r8_seeds", "r = 8, two seeds", ((1, 1), (4, 4), (8, 8))),
    ):
        entries = similarity[key]
        for i, j in cells:
            inside = [e for e in entries if i <= len(e["phi"]) and j <= len(e["phi"][0])]
            if inside:
                mean = sum(e["phi"][i - 1][j - 1] for e in inside) / len(inside)
                rows.append([pair, f"φ({i}, {j})", f"{mean:.3f}", str(len(inside))])
    return rows


def write_report(results: dict, path: str | os.PathLike) -> None:
    """Writes the study's report.html from study.json's contents (the figures are `write_plots`'s, beside it)."""
    task, full, intrinsic = results["task"], results["full"], results["intrinsic"]
    did, said = intrinsic["did"], intrinsic["said"]
    reference = full["metric"]
    lora = results["lora"]
    rank_rows = [[p["r"], f"{p['trainable']:,}", _percent(p["metric"])] for p in lora]
    second = results["lora_second_seed"]
    rank_rows.append([f"{second['r']} (seed 1)", f"{second['trainable']:,}", _percent(second["metric"])])
    point_rows = [
        [
            method.upper(),
            f"{p['d']:,}",
            _percent(p["metric"]),
            "yes" if p["metric"] >= intrinsic[method]["threshold"] else "no",
        ]
        for method in ("did", "said")
        for p in intrinsic[method]["points"]
    ]
    amplification = [
        [
            row["r"],
            f"{row['delta_norm']:.3g}",
            f"{row['weight_norm']:.3g}",
            f"{row['delta_directions']:.3g}",
            f"{row['weight_directions']:.3g}",
            f"{row['random_directions']:.3g}",
            "–" if row["amplification"] is None else f"{row['amplification']:.3g}",
        ]
        for row in amplification_rows(lora)
    ]
    truncation = full["truncation"]
    truncation_rows = [
        [
            f"{row['level']:.0%} of {what}",
            _percent(row["rank_kept"]),
            _percent(row["energy_kept"]),
            _percent(row["stored"]),
            _percent(row["metric"]),
        ]
        for kind, what in (("fraction", "full rank"), ("energy", "the energy"))
        for row in truncation[kind]
    ]
    smallest_lora = min(
        (p for p in lora if p["metric"] >= did["threshold"]), key=lambda p: p["trainable"], default=None
    )
    lora_sentence = (
        f"The smallest LoRA that reaches the threshold is r = {smallest_lora['r']}, with "
        f"{smallest_lora['trainable']:,} trainable parameters."
        if smallest_lora
        else "No LoRA rank of the sweep reaches the threshold."
    )
    esc = html.escape
    sections = [
        "<h1>lorakit study: how many parameters does a fine-tuning need?</h1>",
        f"<p>{esc(task['name'])}: {task['train_examples']:,} training and {task['eval_examples']:,} held-out "
        f"examples. The study fine-tunes {task['trained_parameters']:,} of the model's {task['parameters']:,} "
        f"parameters ({task['tensors']} tensors), every run {task['recipe']['steps']} AdamW steps with the same "
        f"recipe; it took {results['seconds']:.0f} s (a resumed study counts only its own time).</p>",
        "<h2>1. The starting point and full fine-tuning</h2>",
        f"<p>The starting model scores {_percent(results['base_metric'])} held-out accuracy. Training every one of the "
        f"{full['trainable']:,} parameters (full fine-tuning) brings it to {_percent(reference)}: that is the "
        f"reference, and 90% of it, {_percent(did['threshold'])}, is the bar every other way of training has to "
        "clear.</p>",
        "<h2>2. Intrinsic dimension: training in a random subspace</h2>",
        "<p>The notes rest LoRA on a finding of Aghajanyan et al. (2020): a pre-trained model can be fine-tuned "
        "well when its weights may only move within a small random subspace. Following Li et al. (2018), the "
        "parameters are written θ = θ₀ + P θ<sub>d</sub>, with θ₀ the starting weights, P a fixed random D × d "
        "matrix with unit-length, nearly orthogonal columns and θ<sub>d</sub> the only thing that trains; "
        "P is the Fastfood transform H G Π H B, built from Walsh–Hadamard matrices, random signs, a permutation "
        "and Gaussians, so it never exists as a D × d matrix. SAID adds one learned scale per weight tensor, "
        "counted in d. The smallest d that reaches 90% of full fine-tuning is d90, the task's intrinsic "
        "dimension; it is found on a grid of d (×4 apart) and narrowed by bisection.</p>",
        f"<p>DID: {_d90_sentence(did)}. SAID: {_d90_sentence(said)}. {lora_sentence}</p>",
        html_image(
            "parameters.png", "accuracy against trained parameters for subspaces, LoRA ranks and full fine-tuning"
        ),
        html_table(["method", "d", "accuracy", "reaches 90%"], point_rows),
        "<h2>3. LoRA's rank</h2>",
        "<p>The same fine-tuning with LoRA (ΔW = s·B·A on the targeted weights, α = 2r, a new classification head "
        "trained in full) at ranks 1 to 64, on the same axes as the subspaces above: parameters spent as a "
        "random subspace and parameters spent as low-rank updates.</p>",
        html_table(["r", "trainable parameters", "accuracy"], rank_rows),
        "<h2>4. Do adapters learn the same directions?</h2>",
        "<p>The LoRA paper's subspace similarity, φ(i, j) = ‖U<sub>i</sub>ᵀ U<sub>j</sub>‖²<sub>F</sub> / min(i, j), "
        "compares the top-i right singular directions of one adapter's A with the top-j of another's: 1 when one "
        "subspace contains the other, 0 when they are orthogonal, and about max(i, j)/n for random subspaces of "
        "an n-dimensional input. Top row: r = 8 against r = 64 (the paper's figure 3); bottom row: two seeds of "
        "r = 8 (its figure 4). Where the top few directions of different runs agree far beyond chance while "
        "the rest do not, the update is low-rank in the sense that matters: a few directions carry it.</p>",
        html_image("similarity.png", "subspace similarity heatmaps"),
        html_table(["adapters", "φ", "mean over layers", "layers"], _similarity_summary(results["similarity"])),
        "<h2>5. Amplification</h2>",
        "<p>How does ΔW relate to the frozen W? With U, V the top-r left and right singular vectors of ΔW, "
        "‖Uᵀ W V‖<sub>F</sub> measures how much of W lies in ΔW's directions; compare it with W's own top-r "
        "directions and with random ones (the LoRA paper's table 7; medians over layers). When it is far below "
        "W's own and ‖ΔW‖ / ‖Uᵀ W V‖ is large, the update amplifies directions that W holds but does not "
        "emphasise.</p>",
        html_image("amplification.png", "amplification against the LoRA rank"),
        html_table(
            ["r", "‖ΔW‖", "‖W‖", "‖UᵀWV‖, ΔW's", "‖UᵀWV‖, W's own", "‖UᵀWV‖, random", "‖ΔW‖ / ‖UᵀWV‖"],
            amplification,
        ),
        "<h2>6. Truncating the weights</h2>",
        "<p>The notes suggest that pre-trained weight matrices are redundant, that “parameters can be gotten rid "
        "of without decreasing performance”. The honest test: replace each targeted W of the fine-tuned model by "
        "its best rank-k approximation (the top k singular triplets, Eckart–Young) and measure the accuracy, k "
        "as a fraction of the full rank or as the fewest singular values that keep a share of the energy Σσ². "
        "“Stored” is what the factored form B·A would take against the dense W.</p>",
        html_image("truncation.png", "accuracy of the truncated model"),
        html_table(["k", "rank kept", "energy kept", "stored", "accuracy"], truncation_rows),
        f"<p>{_truncation_sentence(truncation, did['threshold'], did)}</p>",
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lorakit study</title>'
        f"<style>{STYLE}{WIDE_TABLES}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    write_text_atomic(path, page)
