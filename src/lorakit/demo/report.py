"""report.html for `lorakit demo`: one page, each step explained in a sentence or two, with its numbers
and plots. The page needs nothing but the PNG files beside it (no scripts, no network)."""

from __future__ import annotations

import html
import os

from lorakit.io.atomic import write_text_atomic

__all__ = ["STYLE", "html_image", "html_table", "low_rank_table", "write_report"]

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { padding: 0.2rem 0.6rem; text-align: right; }
th { border-bottom: 1px solid #999; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .ok { color: #070; } .bad { color: #a00; } code { background: #f3f3f3; }
"""


def low_rank_table(layers: list[dict], r: int) -> tuple[list[str], list[list[str]]]:
    """The low-rank view's headings and rows, as text: one row per layer of the demo's metrics ("layers"), for
    the console and the report alike."""
    headings = ["layer", "W", "rank W", "eff. rank W", "k for 90% energy", f"energy in top {r}", "rank ΔW"]
    rows = [
        [
            row["layer"],
            " × ".join(map(str, row["shape"])),
            str(row["rank"]),
            str(row["effective_rank"]),
            str(row["rank_for_90_energy"]),
            f"{row[f'energy_top_{r}']:.3f}",
            str(row["delta_rank"]),
        ]
        for row in layers
    ]
    return headings, rows


def html_table(header: list[str], rows: list[list[object]]) -> str:
    """An HTML table: one heading row, then the rows, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_image(name: str, alt: str) -> str:
    """An image (a file beside the page) in a paragraph of its own."""
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _base_rank_sentence(layers: list[dict]) -> str:
    full = [row["layer"] for row in layers if row["rank"] == min(row["shape"])]
    if len(full) == len(layers):
        return (
            "The base weights are not low-rank: each is numerically full-rank, its energy spread over many directions."
        )
    return f"Of the base weights, {', '.join(full) or 'none'} are numerically full-rank."


def write_report(path: str | os.PathLike, m: dict) -> None:
    """Writes the demo's report from its metrics (the images are the demo's PNGs, beside `path`)."""
    worst, r = m["worst_digit"], m["rank"]
    verdict = "ok" if m["disabled_equals_original"] else "bad"
    error_rows = [
        [name, *m[f"errors_{key}"], f"{m[f'accuracy_{key}']:.2%}"]
        for name, key in (
            ("before", "before"),
            ("LoRA on", "lora"),
            ("LoRA off", "disabled"),
            ("LoRA + replay", "replay"),
        )
    ]
    sections = [
        f"<h1>lorakit demo: rank-{r} LoRA on an oversized digit classifier</h1>",
        f"<p>Seed {m['seed']}, {m['steps']} fine-tuning steps per adapter, α = {m['alpha']:g}; "
        f"the whole run took {m['seconds']:.1f} s.</p>",
        "<h2>1. The base model</h2>",
        f"<p>An MLP of {m['params_original']:,} parameters (64 → 1000 → 2000 → 10) trained on scikit-learn's "
        f"8×8 digits reaches {m['accuracy_before']:.2%} test accuracy. Digit {worst} is the one it gets wrong "
        f"most often, {m['errors_before'][worst]} times.</p>",
        f"<h2>2. A rank-{r} adapter</h2>",
        f"<p>LoRA adds A (r × in) and B (out × r) beside each frozen weight: {m['params_lora']:,} trainable "
        f"parameters, {100 * m['params_lora'] / m['params_original']:.3f}% of the original.</p>",
        "<h2>3. Fine-tuning on one digit, and switching LoRA off</h2>",
        f"<p>Trained on digit {worst} alone, the adapter brings its errors from {m['errors_before'][worst]} to "
        f"{m['errors_lora'][worst]}. With LoRA switched off, weights and test logits equal the original bit for "
        f'bit: <b class="{verdict}">{m["disabled_equals_original"]}</b>.</p>',
        html_table(["model", *map(str, range(10)), "accuracy"], error_rows),
        html_image("errors.png", "wrong predictions per digit"),
        "<h2>4. Forgetting, and replay</h2>",
        f"<p>Training on a single class pushes the network towards predicting it everywhere: overall accuracy "
        f"goes from {m['accuracy_before']:.2%} to {m['accuracy_lora']:.2%}. A second adapter trained on the same "
        f"digit plus a replay sample of {m['replay_images']} images of the other digits keeps it at "
        f"{m['accuracy_replay']:.2%}, with digit {worst} wrong {m['errors_replay'][worst]} times.</p>",
        html_image("losses.png", "training loss curves"),
        "<h2>5. The low-rank view</h2>",
        f"<p>{_base_rank_sentence(m['layers'])} What is low-rank is the learned update ΔW = s·B·A, whose rank "
        "is at most r.</p>",
        html_table(*low_rank_table(m["layers"], r)),
        html_image("spectra.png", "singular values and cumulative energy of the base weights"),
        "<h2>6. Merging and files</h2>",
        f"<p>Folding the adapter into the weights (W + s·B·A) gives the same function: the test logits differ "
        f"by at most {m['merged_max_abs_diff']:.1e} in float64, and by {m['merged_max_abs_diff_float32']:.1e} in "
        f"float32, round-off on logits as large as {m['max_abs_logit']:.0f}. Saved in PEFT's format "
        f"(<code>adapter/</code>), it takes "
        f"{m['adapter_bytes']:,} bytes on disk; the base model takes {m['base_model_bytes']:,}.</p>",
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lorakit demo</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    write_text_atomic(path, page)
