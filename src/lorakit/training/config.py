"""What a fine-tuning run is asked to do: `TrainConfig`, and what it reports back: `TrainResult`.

Each field of TrainConfig is also a flag of `lorakit finetune`: its metadata holds the flag's name and help,
from which the command line is built (lorakit.cli.arguments), so that the defaults are stated once, here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from lorakit.engine.config import is_svd_init, targets_from_text
from lorakit.io.files import read_json_object
from lorakit.options import flag_of, option
from lorakit.training.chat import FORMATS, LOSS_ON
from lorakit.training.data import Task

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_LR",
    "DTYPES",
    "HEADINGS",
    "INITS",
    "TASKS",
    "TrainConfig",
    "TrainResult",
    "saved_config",
    "settings_to_save",
]

TASKS = get_args(Task)  # ("causal-lm", "seq-cls")
# A new classification head learns from scratch: at causal-lm's rate it is far from done after a few epochs
# (MiniLM on four topics: eval loss 0.64 at 2e-4, 0.03 at 1e-3, the same steps).
DEFAULT_LR = {"causal-lm": 2e-4, "seq-cls": 1e-3}
DTYPES = ("float32", "bfloat16", "float16")
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "milora", "olora")  # pissa_niter_K: K a number


CONFIG_NAME = "train_config.json"  # a run's settings, in its --out from the moment it starts
INVOCATION = ("resume", "overwrite", "progress")  # how a run is started and shown, not what it trains

DATA, LORA, OPTIMIZATION, OUTPUT = "model and data", "LoRA", "optimization", "output and processes"
HEADINGS = (DATA, LORA, OPTIMIZATION, OUTPUT)  # the order of `lorakit finetune --help`


@dataclass
class TrainConfig:
    """Everything `lk.train` needs: each field is also a flag of `lorakit finetune` (see its --help).

    Paths are local directories or files (`model` may also be a hub id). One optimizer step takes
    `grad_accum` micro-batches of `batch_size` examples on each process.
    """

    model: str = option(help="a transformers model directory (or hub name)", metavar="PATH", group=DATA)
    data: str = option(help="training data: .jsonl, .csv or plain text", metavar="FILE", group=DATA)
    out: str = option(help="where the adapter, logs and checkpoints go", metavar="DIR", group=OUTPUT)
    task: Task = option(
        "causal-lm",
        "causal-lm: learn to continue each text; seq-cls: learn each text's label",
        choices=get_args(Task),
        group=DATA,
    )
    text_field: str = option("text", "the text field of JSONL/CSV rows", metavar="NAME", group=DATA)
    label_field: str = option("label", "the label field (seq-cls)", metavar="NAME", group=DATA)
    format: str = option(
        "auto",
        "the rows' format (causal-lm): text, prompt-completion, messages, alpaca or sharegpt; auto detects it from "
        "the first row's fields",
        choices=FORMATS,
        group=DATA,
    )
    chat_template: str | None = option(
        None,
        "a Jinja chat template file, for messages data on a tokenizer that has none (or to replace its own)",
        metavar="FILE",
        group=DATA,
        default_text="the tokenizer's",
    )
    loss_on: str = option(
        "completion",
        "completion: train on the completion / every assistant turn only; all: on every token",
        choices=LOSS_ON,
        group=DATA,
    )
    targets: str | list[str] = option(
        "all-linear",
        "'all-linear', a comma-separated list of module names, or a regex",
        metavar="NAMES",
        group=LORA,
        parse=targets_from_text,
    )
    # --rank first: torchrun's own parser takes "--r" for an abbreviation of its --rdzv-* options
    r: int = option(8, "rank r of the adapter", flags=("--rank", "--r"), group=LORA)
    alpha: float = option(16.0, "α; the update is scaled by α/r", group=LORA)
    dropout: float = option(0.05, "dropout on the adapter's input", group=LORA)
    init: str = option(
        "kaiming",
        "how the adapter starts: kaiming or gaussian (B = 0), or from each weight's own SVD or QR: pissa, "
        "pissa_niter_K (randomized SVD, K iterations), milora, olora; such an adapter is saved as the equivalent "
        "plain LoRA of rank 2r, which loads on the untouched base",
        metavar="{" + ",".join(INITS) + "}",
        group=LORA,
    )
    use_rslora: bool = option(False, "scale the update by α/√r (rank-stabilised LoRA) instead of α/r", group=LORA)
    use_dora: bool = option(
        False, "DoRA: train a magnitude per output beside the low-rank direction (weight-decomposed LoRA)", group=LORA
    )
    modules_to_save: list[str] | None = option(
        None,
        "modules trained in full beside the adapter, comma-separated names (PEFT's modules_to_save)",
        metavar="NAMES",
        group=LORA,
        default_text="none; seq-cls adds the classification head",
        parse=lambda text: [name.strip() for name in text.split(",") if name.strip()],
    )
    lr: float | None = option(
        None,
        "AdamW learning rate of A",
        type=float,
        group=OPTIMIZATION,
        default_text=" for causal-lm, ".join(f"{rate:g}" for rate in DEFAULT_LR.values()) + " for seq-cls",
    )
    lr_ratio: float = option(
        1.0, "LoRA+: B's learning rate is lr × this (the LoRA+ paper suggests 16)", group=OPTIMIZATION
    )
    weight_decay: float = option(0.0, "AdamW weight decay", group=OPTIMIZATION)
    warmup_ratio: float = option(
        0.03, "fraction of steps of linear warm-up before the linear decay", group=OPTIMIZATION
    )
    epochs: int = option(1, "passes over the data", group=OPTIMIZATION, exclusive="length")
    steps: int | None = option(
        None,
        "optimizer steps, instead of --epochs",
        type=int,
        group=OPTIMIZATION,
        exclusive="length",
        default_text="none: --epochs decides",
    )
    batch_size: int = option(8, "examples per micro-batch and process", group=OPTIMIZATION)
    grad_accum: int = option(1, "micro-batches per optimizer step", group=OPTIMIZATION)
    gradient_checkpointing: bool = option(
        False, "recompute each block's activations in the backward pass: less memory, more time", group=OPTIMIZATION
    )
    max_length: int = option(
        256, "cut examples to N tokens, or to the model's own limit where that is smaller", metavar="N", group=DATA
    )
    dtype: str | None = option(
        None,
        "the base model's dtype; the adapter trains in float32 whatever it is, under autocast on a lower-precision "
        "base (as PEFT)",
        choices=DTYPES,
        group=DATA,
        default_text="the model's own",
    )
    load_in_4bit: bool = option(
        False,
        "QLoRA: quantize the base's linear layers to 4 bits as they load (NF4, double quantization, computing in "
        "--dtype; bitsandbytes: pip install 'lorakit[quant]')",
        group=DATA,
        exclusive="quantization",
    )
    load_in_8bit: bool = option(
        False,
        "quantize the base's linear layers to 8 bits as they load (LLM.int8(); bitsandbytes)",
        group=DATA,
        exclusive="quantization",
    )
    packing: bool = option(
        False,
        "causal-lm: pack several examples into each row of --max-length tokens (attention and positions stay "
        "within each example)",
        group=DATA,
    )
    eval_data: str | None = option(
        None,
        "evaluation data in the same format (eval loss and perplexity, or accuracy)",
        metavar="FILE",
        group=DATA,
        default_text="none",
    )
    eval_every: int = option(
        0, "evaluate on --eval-data every N steps (0: before and after training only)", metavar="N", group=DATA
    )
    save_every: int = option(
        0,
        "write an atomic checkpoint every N steps and after the last (0: only the final adapter)",
        metavar="N",
        group=OUTPUT,
    )
    keep_checkpoints: int = option(2, "keep the newest K checkpoints", metavar="K", group=OUTPUT)
    resume: bool = option(
        False,
        "continue from the newest checkpoint in --out, with the run's own settings where --out alone is given "
        "(other flags beside it are changes); without it, an --out that holds checkpoints is refused",
        group=OUTPUT,
    )
    overwrite: bool = option(
        False,
        "start over in an --out that holds an earlier run (a finished adapter or checkpoints), removing its files; "
        "without it, such an --out is refused",
        group=OUTPUT,
    )
    seed: int = option(0, "seed for initialisation, data order and dropout, 0 to 2**32 - 1", group=OPTIMIZATION)
    fsdp: bool = option(
        False, "under torchrun: shard the frozen base model with FSDP2 instead of replicating it", group=OUTPUT
    )
    progress: bool = option(True, "no progress bar", group=OUTPUT)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name, allowed in (("format", FORMATS), ("loss_on", LOSS_ON)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{flag_of(self, name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.task == "seq-cls" and (self.packing or self.format not in ("auto", "text") or self.chat_template):
            raise ValueError("--packing, --format and --chat-template are for --task causal-lm")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one of them")
        if not (self.init in ("kaiming", "gaussian") or is_svd_init(self.init)):
            raise ValueError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other: give one of them")
        if self.bits and self.fsdp:
            raise ValueError(f"--fsdp does not shard quantized weights: drop --load-in-{self.bits}bit or --fsdp")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list) or not all(isinstance(n, str) for n in self.modules_to_save)
        ):
            raise ValueError(f"--modules-to-save must be a list of module names, got {self.modules_to_save!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.task]

        def whole(v: Any) -> bool:
            return isinstance(v, int)

        checks = [
            ("r", lambda v: whole(v) and v > 0, "a positive integer"),
            ("alpha", math.isfinite, "a finite number"),
            ("lr", lambda v: 0 < v < math.inf, "a positive number"),
            ("lr_ratio", lambda v: 0 < v < math.inf, "a positive number"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
            ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("epochs", lambda v: whole(v) and v > 0, "a positive integer"),
            ("batch_size", lambda v: whole(v) and v > 0, "a positive integer"),
            ("grad_accum", lambda v: whole(v) and v > 0, "a positive integer"),
            ("max_length", lambda v: whole(v) and v >= 2, "an integer of at least 2"),
            ("save_every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            ("eval_every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            ("keep_checkpoints", lambda v: whole(v) and v > 0, "a positive integer"),
            ("seed", lambda v: whole(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),  # data order: epoch_order
        ]
        if self.steps is not None:
            checks.append(("steps", lambda v: whole(v) and v > 0, "a positive integer"))
        for name, ok, what in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ValueError(f"{flag_of(self, name)} must be {what}, got {value!r}")

    @property
    def bits(self) -> int | None:
        """4 or 8 where the base loads quantized (--load-in-4bit, --load-in-8bit), else None."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None


@dataclass
class TrainResult:
    """What `lk.train` returns.

    Attributes:
        out: the run's directory (the adapter, metrics.jsonl, loss.png, checkpoints).
        steps: the run's total optimizer steps.
        final_loss: the last step's training loss; None when no step ran (a resume of a finished run), not
            finite if the run diverged.
        eval: the final eval metrics ({} without eval data): eval_loss, and eval_accuracy for seq-cls.
        seconds: the wall-clock time of the run.
    """

    out: Path
    steps: int
    final_loss: float | None
    eval: dict[str, float]
    seconds: float


LOCAL_PATHS = ("model", "data", "eval_data", "chat_template")  # settings that may name files of this machine


def settings_to_save(config: TrainConfig) -> dict[str, Any]:
    """`config` as train_config.json records it: every field, with the files it names made absolute, so that
    `--resume --out DIR` continues the run from any working directory. A model named by its hub name (no such
    path here) is kept as given."""
    settings = dataclasses.asdict(config)
    for key in LOCAL_PATHS:
        if settings[key] is not None and Path(settings[key]).exists():
            settings[key] = str(Path(settings[key]).resolve())
    return settings


def saved_config(out: str | os.PathLike) -> dict[str, Any]:
    """The settings of the run in `out`, from its train_config.json, as TrainConfig's keyword arguments (without
    resume, overwrite and progress, which belong to each start of a run): what `lorakit finetune --resume --out
    DIR` continues with, other flags given beside it changing them.

        lk.train(lk.TrainConfig(**{**saved_config("run"), "steps": 1000, "resume": True}))

    Raises:
        FileNotFoundError: `out` holds no train_config.json.
        ValueError: the file is not a JSON object of TrainConfig's settings.
    """
    path = Path(out) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no {CONFIG_NAME} to take the run's settings from")
    saved = read_json_object(path)
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = [key for key in saved if key not in known]
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not a setting of a run")
    return {key: value for key, value in saved.items() if key not in INVOCATION}
