"""`lorakit finetune`: LoRA fine-tuning of a transformers model on a local data file (see lorakit.training).

lorakit finetune --model ./my-model --data train.jsonl --out run/ --steps 500 --save-every 100
torchrun --nproc_per_node 2 -m lorakit finetune ...      # several processes, DDP (or --fsdp)
"""

from __future__ import annotations

import argparse

from lorakit.engine.config import targets_from_text
from lorakit.training.config import TASKS, TrainConfig
from lorakit.training.loop import train

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a transformers model with LoRA on local data",
        description="Fine-tune a Hugging Face transformers model with LoRA on a JSONL, CSV or text file and write "
        "a PEFT-format adapter to --out, with metrics.jsonl, loss.png and (with --save-every) checkpoints that "
        "--resume continues from. Run it under torchrun for several processes.",
    )
    data = p.add_argument_group("model and data")
    data.add_argument("--model", required=True, metavar="PATH", help="a transformers model directory (or hub name)")
    data.add_argument("--data", required=True, metavar="FILE", help="training data: .jsonl, .csv or plain text")
    data.add_argument("--eval-data", metavar="FILE", help="evaluation data in the same format (eval loss, accuracy)")
    data.add_argument(
        "--task",
        choices=TASKS,
        default="causal-lm",
        help="causal-lm: learn to continue each text; seq-cls: learn each text's label",
    )
    data.add_argument("--text-field", default="text", metavar="NAME", help="the text field of JSONL/CSV rows")
    data.add_argument("--label-field", default="label", metavar="NAME", help="the label field (seq-cls)")
    data.add_argument(
        "--max-length",
        type=int,
        default=256,
        metavar="N",
        help="cut examples to N tokens, or to the model's own limit where that is smaller (default 256)",
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument(
        "--targets",
        default="all-linear",
        metavar="NAMES",
        help="'all-linear', a comma-separated list of module names, or a regex (default all-linear)",
    )
    # --rank first: torchrun's own parser takes "--r" for an abbreviation of its --rdzv-* options
    lora.add_argument("--rank", "--r", dest="r", type=int, default=8, help="rank r of the adapter (default 8)")
    lora.add_argument("--alpha", type=float, default=16.0, help="α; the update is scaled by α/r (default 16)")
    lora.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input (default 0.05)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of A (default 2e-4)")
    opt.add_argument(
        "--lr-ratio",
        type=float,
        default=1.0,
        help="LoRA+: B's learning rate is lr × this (default 1; the LoRA+ paper suggests 16)",
    )
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.03,
        help="fraction of steps of linear warm-up before the linear decay (default 0.03)",
    )
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs")
    opt.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch and process (default 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and dropout")
    run_group = p.add_argument_group("output and processes")
    run_group.add_argument("--out", required=True, metavar="DIR", help="where the adapter, logs and checkpoints go")
    run_group.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="N",
        help="write an atomic checkpoint every N steps and after the last (default 0: none)",
    )
    run_group.add_argument("--keep-checkpoints", type=int, default=2, metavar="K", help="keep the newest K (default 2)")
    run_group.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out; without it, an --out that holds checkpoints is refused",
    )
    run_group.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the frozen base model with FSDP2 instead of replicating it",
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    config = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        task=args.task,
        text_field=args.text_field,
        label_field=args.label_field,
        targets=targets_from_text(args.targets),
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.lr,
        lr_ratio=args.lr_ratio,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        eval_data=args.eval_data,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        seed=args.seed,
        fsdp=args.fsdp,
        progress=not args.no_progress,
    )
    train(config)
