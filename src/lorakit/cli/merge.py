"""`lorakit merge`: the base model with an adapter folded in, as a transformers model directory for serving
(see lorakit.inference.export).

lorakit merge --model ./my-llama --adapter run/ --out merged/ [--dtype bfloat16] [--load-in-4bit | --load-in-8bit]
"""

from __future__ import annotations

import argparse

from lorakit.io.console import make_console
from lorakit.training.config import DTYPES  # the names alone: inference.export maps them to torch dtypes

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="fold an adapter into its base model and write a transformers model directory for serving",
        description="Load the base model, fold the adapter into its weights and write a complete transformers "
        "model directory to --out: safetensors weights, config, tokenizer with its chat template, generation "
        "config. It loads with AutoModelForCausalLM.from_pretrained (AutoModelForSequenceClassification for a "
        "seq-cls adapter) and in servers that read such directories, without lorakit or PEFT. The write is "
        "atomic: a failure leaves no --out.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model's local transformers directory")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a PEFT-format adapter trained on that model")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write the merged model: a new or empty directory outside --model and --adapter",
    )
    # no argparse choices: a bad value is then one "lorakit: error:" line, as for every other bad input
    p.add_argument(
        "--dtype",
        metavar="{" + ",".join(DTYPES) + "}",
        help="the dtype of the written weights (default: the base model's own)",
    )
    quantized = p.add_mutually_exclusive_group()
    for bits in (4, 8):
        quantized.add_argument(
            f"--load-in-{bits}bit",
            dest="bits",
            action="store_const",
            const=bits,
            help=f"the adapter was trained on the base quantized to {bits} bits: load it so, and write its dequantized "
            "weights with the adapter added, in full precision (default: as the run in --adapter says)",
        )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lorakit.inference.export import merge_to_directory

    out = merge_to_directory(args.model, args.adapter, args.out, dtype=args.dtype, bits=args.bits)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    make_console().print(f"merged model written to {out}/ ({human_size(size)})")


def human_size(size: int) -> str:
    """A byte count as people read it: 812 B, 25 kB, 8.3 MB, 14.2 GB (powers of 1000, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size} B"
