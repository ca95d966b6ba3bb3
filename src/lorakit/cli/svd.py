"""The SVD adapter commands (see lorakit.tools):

lorakit extract BASE TUNED (--rank R | --energy F) --out DIR    a full fine-tune → an adapter
lorakit resize DIR (--rank R | --energy F) --out DIR2           the best lower-rank adapter
lorakit combine DIR1 DIR2 ... [--weights ...] [--method svd] --out DIR
lorakit inspect DIR [--plot spectrum.png]                       ranks and spectra of each ΔW
lorakit compare DIR1 DIR2 [--plot similarity.png]               subspace and cosine similarity
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from lorakit.engine.config import targets_from_text
from lorakit.io.console import make_console
from lorakit.io.plots import similarity_heatmaps, spectrum_plot
from lorakit.tools.extract import extract
from lorakit.tools.inspect import compare, inspect
from lorakit.tools.resize import COMBINE_METHODS, combine, resize

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="turn a fully fine-tuned model into a LoRA adapter (truncated SVD of each ΔW)",
        description="For each 2-D weight that differs between BASE and TUNED, the truncated SVD of "
        "ΔW = W_tuned − W_base, at a fixed rank or at the smallest rank holding an energy fraction; writes a "
        "PEFT-format adapter that loads on BASE, and report.json with each layer's rank and error.",
    )
    p.add_argument("base", metavar="BASE", help="the base model: a .safetensors file or a model directory")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model, in the same form")
    _rank_or_energy(p)
    p.add_argument("--targets", metavar="NAMES", help="only these modules: comma-separated names or a regex")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the adapter")
    p.set_defaults(run=run_extract)

    p = sub.add_parser(
        "resize",
        help="the optimal lower-rank version of an adapter, from its factors alone",
        description="Per layer, the best rank-R approximation of ΔW = s·B·A (or the rank holding an energy "
        "fraction), computed from QR decompositions of B and Aᵀ and the SVD of an r × r core: the full ΔW is "
        "never formed.",
    )
    p.add_argument("adapter", metavar="DIR", help="a PEFT-format adapter directory")
    _rank_or_energy(p)
    p.add_argument("--out", required=True, metavar="DIR2", help="where to write the resized adapter")
    p.set_defaults(run=run_resize)

    p = sub.add_parser(
        "combine",
        help="one adapter from several: cat (exact), svd (best rank-r fit) or linear",
        description="An adapter for the weighted sum of the adapters' updates, Σ wᵢ ΔWᵢ, per layer. 'cat' "
        "stacks the factors (exact, rank = sum of ranks); 'svd' is the best rank-R fit of the sum; 'linear' "
        "adds the factors themselves (equal ranks only; inexact). Prints each layer's relative error.",
    )
    p.add_argument("adapters", nargs="+", metavar="DIR", help="two or more adapter directories")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter (default 1 each)")
    p.add_argument("--method", choices=COMBINE_METHODS, default="svd", help="how to combine (default svd)")
    p.add_argument("--rank", type=int, metavar="R", help="rank of the svd result (default: the largest input rank)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the combined adapter")
    p.set_defaults(run=run_combine)

    p = sub.add_parser(
        "inspect",
        help="per layer: r, α, scale, singular values, numerical and effective rank of ΔW",
        description="What an adapter holds, layer by layer: r, α, the scale s, the singular values of ΔW = s·B·A "
        "(from the factors), its numerical and effective rank, and how its energy is spread.",
    )
    p.add_argument("adapter", metavar="DIR", help="a PEFT-format adapter directory")
    p.add_argument("--plot", metavar="PNG", help="write the spectra and energy curves as a PNG")
    p.add_argument("--json", action="store_true", help="one JSON object per layer instead of a table")
    p.set_defaults(run=run_inspect)

    p = sub.add_parser(
        "compare",
        help="subspace similarity (LoRA paper §7) and cosine similarity of two adapters",
        description="For each layer the two adapters share: the normalised subspace similarity φ(i, j) of "
        "their A matrices' top-i and top-j right singular vectors, and the cosine similarity of the two ΔW.",
    )
    p.add_argument("first", metavar="DIR1", help="an adapter directory")
    p.add_argument("second", metavar="DIR2", help="another adapter directory on the same base model")
    p.add_argument("--plot", metavar="PNG", help="write the φ(i, j) heatmaps as a PNG")
    p.add_argument("--json", action="store_true", help="one JSON object per layer instead of a table")
    p.set_defaults(run=run_compare)


def _rank_or_energy(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, metavar="R", help="the same rank for every layer")
    group.add_argument(
        "--energy",
        type=float,
        metavar="F",
        help="per layer, the smallest rank holding this fraction of ‖ΔW‖²_F, in (0, 1]",
    )


def _report_table(console: Console, title: str, layers: dict[str, dict], columns: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_edge=False)
    table.add_column("layer")
    for heading, _ in columns:
        table.add_column(heading, justify="right")
    for path, row in layers.items():
        table.add_row(path, *(_cell(row[key]) for _, key in columns))
    console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1e-3 else f"{value:.4f}"
    if isinstance(value, list):
        return " × ".join(map(str, value))
    return str(value)


# The arguments are checked once, by the library: its ValueErrors reach the user as "lorakit: error: ...".


def run_extract(args: argparse.Namespace) -> None:
    targets = targets_from_text(args.targets)
    state = extract(args.base, args.tuned, r=args.rank, energy=args.energy, targets=targets)
    state.config["base_model_name_or_path"] = str(args.base)
    state.save(args.out)
    console = make_console()
    columns = [("W", "shape"), ("rank", "rank"), ("rel. error", "relative_error"), ("energy kept", "energy_kept")]
    _report_table(console, "Extracted layers", state.report["layers"], columns)
    other = state.report["other_changed"]
    if other:
        console.print(
            f"{len(other)} other tensor(s) changed but are not 2-D weights (or not targeted), so not in "
            f"the adapter: {', '.join(other[:5])}{' …' if len(other) > 5 else ''}"
        )
    console.print(f"adapter written to {args.out}/ (report.json beside it)")


def run_resize(args: argparse.Namespace) -> None:
    state = resize(args.adapter, r=args.rank, energy=args.energy)
    state.save(args.out)
    columns = [
        ("rank before", "rank_before"),
        ("rank", "rank"),
        ("rel. error", "relative_error"),
        ("energy kept", "energy_kept"),
    ]
    console = make_console()
    _report_table(console, "Resized layers", state.report["layers"], columns)
    console.print(f"adapter written to {args.out}/")


def run_combine(args: argparse.Namespace) -> None:
    state = combine(args.adapters, args.weights, method=args.method, r=args.rank)
    state.save(args.out)
    console = make_console()
    _report_table(
        console,
        f"Combined ({args.method})",
        state.report["layers"],
        [("rank", "rank"), ("rel. error", "relative_error")],
    )
    console.print(f"adapter written to {args.out}/")


def run_inspect(args: argparse.Namespace) -> None:
    rows = list(inspect(args.adapter))
    console = make_console()
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        layers = {
            row["layer"]: {
                **row,
                "top": ", ".join(f"{s:.3g}" for s in row["singular_values"][:4]),
                "half": next(k for k, e in enumerate(row["energy"], start=1) if e >= 0.5),
            }
            for row in rows
        }
        columns = [
            ("ΔW", "shape"),
            ("r", "r"),
            ("α", "alpha"),
            ("scale", "scale"),
            ("rank", "rank"),
            ("eff. rank", "effective_rank"),
            ("k for 50% energy", "half"),
            ("top singular values", "top"),
        ]
        _report_table(console, f"Adapter {args.adapter}", layers, columns)
    if args.plot:
        spectrum_plot({row["layer"]: torch.tensor(row["singular_values"]) for row in rows}, args.plot)
        console.print(f"spectrum plot: {args.plot}")


def run_compare(args: argparse.Namespace) -> None:
    rows = list(compare(args.first, args.second))
    console = make_console()
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        layers = {row["layer"]: {**row, "phi_full": row["phi"][-1][-1], "phi_top": row["phi"][0][0]} for row in rows}
        columns = [("r₁", "r1"), ("r₂", "r2"), ("φ(1, 1)", "phi_top"), ("φ(r₁, r₂)", "phi_full"), ("cos ΔW", "cosine")]
        _report_table(console, "Adapter similarity", layers, columns)
    if args.plot:
        similarity_heatmaps({row["layer"]: row["phi"] for row in rows}, args.plot)
        console.print(f"similarity plot: {args.plot}")
