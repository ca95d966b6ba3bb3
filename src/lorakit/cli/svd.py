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
import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from lorakit.engine.config import targets_from_text
from lorakit.io.console import make_console, shorten_names
from lorakit.io.outputs import check_output
from lorakit.tools import COMBINE_METHODS

if TYPE_CHECKING:
    from lorakit.tools.stored import AdapterState

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    # The usage lines are written out, directories first: argparse's own put them after --out's value, where
    # "--out DIR2 DIR" reads as two values of --out (tests/cli/test_help.py holds them to the parsers).
    p = sub.add_parser(
        "extract",
        usage="%(prog)s [-h] BASE TUNED (--rank R | --energy F) [--targets NAMES] --out DIR",
        help="turn a fully fine-tuned model into a LoRA adapter (truncated SVD of each ΔW)",
        description="For each 2-D weight that differs between BASE and TUNED, the truncated SVD of "
        "ΔW = W_tuned − W_base, at a fixed rank or at the smallest rank holding an energy fraction; writes a "
        "PEFT-format adapter that loads on BASE, and report.json with each layer's rank and error.",
    )
    p.add_argument("base", metavar="BASE", help="the base model: a .safetensors file or a model directory")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model, in the same form")
    _rank_or_energy(p)
    p.add_argument(
        "--targets",
        metavar="NAMES",
        help="only these modules: comma-separated names or a regex (default: every 2-D weight that differs)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the adapter")
    p.set_defaults(run=run_extract)

    p = sub.add_parser(
        "resize",
        usage="%(prog)s [-h] DIR (--rank R | --energy F) --out DIR2",
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
        usage="%(prog)s [-h] DIR DIR [DIR ...] [--weights W [W ...]] [--method {" + ",".join(COMBINE_METHODS) + "}] "
        "[--rank R] --out DIR2",
        help="one adapter from several: cat (exact), svd (best rank-r fit) or linear",
        description="An adapter for the weighted sum of the adapters' updates, Σ wᵢ ΔWᵢ, per layer. 'cat' "
        "stacks the factors (exact, rank = sum of ranks); 'svd' is the best rank-R fit of the sum; 'linear' "
        "adds the factors themselves (equal ranks only; inexact). Prints each layer's relative error.",
    )
    p.add_argument("adapters", nargs="+", metavar="DIR", help="two or more adapter directories")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per adapter: the result is the sum Σ wᵢ ΔWᵢ, not an average (0.5 0.5 for the mean of "
        "two) (default: 1 each)",
    )
    p.add_argument("--method", choices=COMBINE_METHODS, default="svd", help="how to combine (default: svd)")
    p.add_argument("--rank", type=int, metavar="R", help="rank of the svd result (default: the largest input rank)")
    p.add_argument("--out", required=True, metavar="DIR2", help="where to write the combined adapter")
    p.set_defaults(run=run_combine)

    p = sub.add_parser(
        "inspect",
        help="per layer: r, α, scale, singular values, numerical and effective rank of ΔW",
        description="What an adapter holds, layer by layer: r, α, the scale s, the singular values of ΔW = s·B·A "
        "(from the factors), its numerical and effective rank, and how its energy is spread.",
    )
    p.add_argument("adapter", metavar="DIR", help="a PEFT-format adapter directory")
    p.add_argument("--plot", metavar="PNG", help="write the spectra and energy curves as a PNG (default: none)")
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
    p.add_argument("--plot", metavar="PNG", help="write the φ(i, j) heatmaps as a PNG (default: none)")
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
    """One row per layer; where the table is wider than the console, the layer names give way from their start,
    whose end tells q_proj from k_proj."""

    def table(names: dict[str, str]) -> Table:
        table = Table(title=title, show_edge=False)
        table.add_column("layer", no_wrap=True)
        for heading, _ in columns:
            table.add_column(heading, justify="right")
        for path, row in layers.items():
            table.add_row(names[path], *(_cell(row[key]) for _, key in columns))
        return table

    whole = table({path: path for path in layers})
    excess = console.measure(whole, options=console.options.update_width(10**6)).maximum - console.width
    longest = max(map(len, layers), default=0)
    console.print(table(shorten_names(list(layers), longest - excess)) if excess > 0 else whole)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1e-3 else f"{value:.4f}"
    if isinstance(value, list):
        return " × ".join(map(str, value))
    return str(value)


# The arguments are checked once, by the library: its ValueErrors reach the user as "lorakit: error: ...".


def run_extract(args: argparse.Namespace) -> None:
    from lorakit.tools.extract import extract

    check_output(args.out, [("BASE", args.base), ("TUNED", args.tuned)])
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


def _extras_text(state: AdapterState) -> str:
    """The tensors an adapter holds besides its LoRA factors, in words: "2 (classifier.weight, classifier.bias:
    modules_to_save copy)"."""
    from lorakit.tools.stored import extra_kind

    kinds: dict[str, list[str]] = {}
    for key in state.extras():
        kinds.setdefault(extra_kind(key, state.config), []).append(key.removeprefix("base_model.model."))
    shown = "; ".join(f"{', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}: {kind}" for kind, keys in kinds.items())
    return f"{len(state.extras())} ({shown})"


def run_resize(args: argparse.Namespace) -> None:
    from lorakit.tools.resize import resize
    from lorakit.tools.stored import AdapterState

    check_output(args.out, [("adapter", args.adapter)])
    source = AdapterState.load(args.adapter)
    state = resize(source, r=args.rank, energy=args.energy)
    state.save(args.out)
    columns = [
        ("rank before", "rank_before"),
        ("rank", "rank"),
        ("rel. error", "relative_error"),
        ("energy kept", "energy_kept"),
    ]
    console = make_console()
    _report_table(console, "Resized layers", state.report["layers"], columns)
    if source.extras():
        console.print(f"kept unchanged the tensors besides the LoRA factors: {_extras_text(source)}")
    console.print(f"adapter written to {args.out}/")


def run_combine(args: argparse.Namespace) -> None:
    from lorakit.tools.resize import combine

    check_output(args.out, [("adapter", adapter) for adapter in args.adapters])
    state = combine(args.adapters, args.weights, method=args.method, r=args.rank)
    state.save(args.out)
    console = make_console()
    _report_table(
        console,
        f"Combined ({args.method})",
        state.report["layers"],
        [("rank", "rank"), ("rel. error", "relative_error")],
    )
    extras = state.report["extras"]
    if extras["summed"]:
        average = (
            "an average" if math.isclose(extras["weight_sum"], 1.0) else f"weights summing to {extras['weight_sum']:g}"
        )
        console.print(f"added up the tensors besides the LoRA factors as Σ wᵢ Tᵢ ({average}): {_extras_text(state)}")
    if extras["kept"]:
        console.print(f"kept {extras['kept']} base weight(s) saved beside the factors, equal in every adapter")
    console.print(f"adapter written to {args.out}/")


def run_inspect(args: argparse.Namespace) -> None:
    import torch

    from lorakit.io.plots import spectrum_plot
    from lorakit.tools.inspect import inspect
    from lorakit.tools.stored import AdapterState, extra_kind

    if args.plot:
        check_output(args.plot, [("adapter", args.adapter)], "--plot")
    state = AdapterState.load(args.adapter)
    rows = list(inspect(state))
    extras = [
        {"tensor": key, "kind": extra_kind(key, state.config), "shape": list(t.shape), "dtype": str(t.dtype)[6:]}
        for key, t in state.extras().items()
    ]
    console = make_console()
    if args.json:
        for row in [*rows, *extras]:  # the layers' objects, then one per tensor besides the factors
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
        if extras:
            tensors = {row["tensor"].removeprefix("base_model.model."): row for row in extras}
            columns = [("kind", "kind"), ("shape", "shape"), ("dtype", "dtype")]
            _report_table(console, "Besides the LoRA factors", tensors, columns)
    if args.plot:
        spectrum_plot({row["layer"]: torch.tensor(row["singular_values"]) for row in rows}, args.plot)
        console.print(f"spectrum plot: {args.plot}")


def run_compare(args: argparse.Namespace) -> None:
    from lorakit.io.plots import similarity_heatmaps
    from lorakit.tools.inspect import compare
    from lorakit.tools.stored import AdapterState

    if args.plot:
        check_output(args.plot, [("adapter", args.first), ("adapter", args.second)], "--plot")
    states = [(name, AdapterState.load(name)) for name in (args.first, args.second)]
    rows = list(compare(*(state for _, state in states)))
    for name, state in states:
        if state.extras():  # on stderr under --json, whose stdout is JSON lines alone
            make_console(stderr=args.json).print(
                f"compared the LoRA factors only; skipped in {name}: {_extras_text(state)}"
            )
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
