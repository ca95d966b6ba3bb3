"""`lorakit rank`: the rank, effective rank, energy and spectrum of matrices read from files.

lorakit rank weights.safetensors --energy 0.9 --plot spectrum.png
lorakit rank matrix.csv
lorakit rank --example        # the worked examples of the notes lorakit grew from
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorakit.io.console import make_console
from lorakit.io.outputs import check_output

if TYPE_CHECKING:
    import torch

__all__ = ["add_parser", "matrix_stats"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="numerical rank, effective rank and spectrum of a matrix",
        description="Print the shape, numerical rank, effective rank, the rank that holds an energy "
        "fraction and the top singular values of each matrix in FILE.",
    )
    p.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="a .npy array, a .csv/.txt matrix (comma- or whitespace-separated) or a .safetensors file",
    )
    p.add_argument(
        "--key",
        metavar="NAME",
        help="the tensor to read from a .safetensors file (default: every 2-D floating-point one)",
    )
    p.add_argument(
        "--energy",
        type=float,
        default=0.9,
        metavar="F",
        help="report the smallest rank holding this fraction of ‖M‖²_F, in (0, 1] (default: 0.9)",
    )
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many singular values to print (default: 5)")
    p.add_argument(
        "--plot", metavar="PNG", help="write a PNG of the spectra and cumulative energy curves (default: none)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per matrix instead of a table")
    p.add_argument("--example", action="store_true", help="walk through the worked examples of the LoRA notes")
    p.set_defaults(run=run)


def matrix_stats(S: torch.Tensor, shape: tuple[int, ...], energy_fraction: float = 0.9, top: int = 5) -> dict:
    """The numbers `lorakit rank` prints for one matrix of `shape` from its singular values S, JSON-ready."""
    from lorakit import lowrank

    return {
        "shape": list(shape),
        "rank": lowrank.rank_of_spectrum(S, shape),
        "effective_rank": round(lowrank.effective_rank_of_spectrum(S), 4),
        "energy_fraction": energy_fraction,
        "rank_for_energy": lowrank.rank_for_energy_of_spectrum(S, energy_fraction),
        "top_singular_values": [float(f"{s:.6g}") for s in S[:top].tolist()],
    }


def _print_table(stats: dict[str, dict], console: Console) -> None:
    fraction = next(iter(stats.values()))["energy_fraction"]
    table = Table(show_edge=False)
    for column in ("matrix", "shape", "rank", "eff. rank", f"rank @ {fraction:g} energy", "top singular values"):
        table.add_column(column, overflow="fold")
    for name, s in stats.items():
        table.add_row(
            name,
            " × ".join(map(str, s["shape"])),
            str(s["rank"]),
            f"{s['effective_rank']:.2f}",
            str(s["rank_for_energy"]),
            ", ".join(f"{v:.4g}" for v in s["top_singular_values"]),
        )
    console.print(table)


def run(args: argparse.Namespace) -> None:
    if not 0 < args.energy <= 1:
        raise ValueError(f"--energy must be in (0, 1], got {args.energy}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    if bool(args.example) == bool(args.file):
        raise ValueError("give a FILE or --example, not both" if args.file else "give a FILE, or --example")
    if args.example and (args.json or args.plot or args.key):
        raise ValueError("--json, --plot and --key apply to a FILE, not to --example")
    console = make_console()
    if args.example:
        walk_through_examples(console)
        return
    from lorakit import lowrank
    from lorakit.io.matrices import read_matrices
    from lorakit.io.plots import spectrum_plot

    if args.plot:
        check_output(args.plot, [("matrix file", args.file)], "--plot")
    matrices = read_matrices(args.file, args.key)
    spectra = {name: lowrank.singular_values(M) for name, M in matrices.items()}  # one SVD per matrix serves all
    stats = {name: matrix_stats(S, tuple(matrices[name].shape), args.energy, args.top) for name, S in spectra.items()}
    if args.json:
        for name, s in stats.items():
            print(json.dumps({"matrix": name, **s}))
    else:
        _print_table(stats, console)
    if args.plot:
        spectrum_plot(spectra, args.plot, args.energy)
        console.print(f"spectrum plot: {args.plot}")


def walk_through_examples(console: Console) -> None:
    """The notes' worked examples, computed rather than quoted."""
    import torch

    from lorakit import lowrank

    torch.manual_seed(0)
    say = console.print

    say("[bold]1. Rank counts independent rows.[/bold] Row 3 = row 1 + row 2:")
    M1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    say(f"   {escape(str(M1.tolist()))}  ->  rank {lowrank.rank(M1)}")

    say("\n[bold]2. The SVD finds rank reliably.[/bold] Row 2 = 2 × row 1:")
    M2 = torch.tensor([[1.0, 2, 3], [2, 4, 6], [1, 3, 5]], dtype=torch.float64)
    S2 = lowrank.singular_values(M2)
    say(f"   {escape(str(M2.tolist()))}")
    say(f"   singular values {', '.join(f'{s:.4f}' for s in S2.tolist())}  ->  rank {lowrank.rank(M2)}")
    say("   (the notes quote 'about 9.5 and 0.7' as rough figures; these are the computed values, and the")
    say("   third is zero only up to round-off, which is why rank uses a tolerance rather than '!= 0')")

    say("\n[bold]3. A product of thin matrices has low rank[/bold], and its SVD gives LoRA-shaped factors:")
    W = torch.randn(10, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)
    B, A = lowrank.factors(W, 2)
    x, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    y_full, y_factored = W @ x + b, B @ (A @ x) + b
    say(f"   W = randn(10, 2) @ randn(2, 10): rank {lowrank.rank(W)}, effective rank {lowrank.effective_rank(W):.2f}")
    kept = B.numel() + A.numel()
    say(f"   B {tuple(B.shape)} and A {tuple(A.shape)} from U√Σ and √ΣVᵀ: {kept} numbers instead of {W.numel()}")
    say(f"   max |W x + b − B (A x) − b| = {float((y_full - y_factored).abs().max()):.2e}")

    say("\n[bold]4. The best rank-r approximation[/bold] (Eckart–Young) of a random 50 × 40 matrix:")
    M4 = torch.randn(50, 40, dtype=torch.float64)
    for r in (1, 5, 20, 40):
        rel = lowrank.approx_error(M4, r) / float(torch.linalg.matrix_norm(M4))
        say(f"   r = {r:2d}: relative Frobenius error {rel:.3f}, energy kept {float(lowrank.energy(M4)[r - 1]):.3f}")
    say("   A random matrix is full-rank and spreads its energy; so are pre-trained weights (measured on")
    say("   all-MiniLM-L6-v2: all 41 matrices full-rank in float64). LoRA bets on the update ΔW being low-rank.")
