"""Exporting a fine-tuned model for serving: the base model with an adapter folded into its weights, written as
a complete transformers model directory that loads like any other model.

    lorakit merge --model ./my-llama --adapter run/ --out merged/ [--dtype bfloat16]
    merge_to_directory("./my-llama", "run/", "merged/")

The directory holds the weights as safetensors (model.safetensors, or shards and their index), config.json,
the tokenizer's files with its chat template, and generation_config.json where the model generates: what
`AutoModelForCausalLM.from_pretrained` reads, and servers that read such directories (vLLM, TGI, ...).
Nothing is unpickled on the way: the base loads from safetensors only, the adapter from PEFT's files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.engine.adapter_files import load_adapter
from lorakit.engine.config import within_target
from lorakit.engine.model import merge_and_unload
from lorakit.engine.peft_format import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    config_from_peft,
    is_factor_key,
    read_adapter_config,
    read_adapter_weights,
)
from lorakit.io.atomic import atomic_dir
from lorakit.io.files import open_safetensors, read_json_object
from lorakit.io.labels import LABELS_NAME, label_config, read_labels
from lorakit.io.outputs import check_output as check_output_path
from lorakit.training.config import DTYPES as DTYPE_NAMES
from lorakit.training.config import saved_config
from lorakit.training.models import load_model_and_tokenizer, take_run_chat_template
from lorakit.training.quantize import BITS

__all__ = ["DTYPES", "classifier_labels", "merge_to_directory"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # {"float32": torch.float32, ...}
HEADS = ["classifier", "score"]  # the classification heads of transformers' sequence-classification models


def merge_to_directory(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    bits: int | None = None,
) -> Path:
    """Writes the base model with the adapter folded into its weights as a transformers model directory.

    The model class follows the adapter's task_type: "SEQ_CLS" loads a sequence-classification model (its
    labels from labels.json beside the adapter, which names them in the config's id2label and label2id, or else
    counted from the classification head saved in the adapter), any other a causal LM. The weights
    are merged in the output dtype, or in float32 where the base loads in another dtype, so that each is
    rounded once. The config and tokenizer are saved as fine-tuning used them (a tokenizer without a pad token
    pads with its eos), with the base's own `use_cache`.

    An adapter trained on a quantized base (QLoRA) learnt its update against the quantized weights Ŵ, not the
    original W: the base then loads quantized as in training, and the merged model holds Ŵ + s·B·A in full
    precision (`merge_and_unload(dequantize=True)`), computing what the model computed in training.

    The write is atomic: everything goes to a temporary directory beside `out` first, so a failure at any
    point leaves no `out` behind (and an existing empty `out` empty).

    Args:
        model: the base model's local transformers directory (config.json, safetensors weights, tokenizer).
        adapter: a PEFT-format adapter directory trained on that model (adapter_config.json and
            adapter_model.safetensors).
        out: the directory to write: new, or empty; never the model or adapter directory or inside them.
        dtype: the weights' dtype, "float32", "bfloat16" or "float16" (None: the base model's own, as its
            config.json states it, else as it loads).
        bits: 4 or 8 for an adapter trained on a base quantized to so many bits (None: as the run that trained it
            says in its train_config.json beside the adapter, and no quantization without one).

    Returns:
        `out`, as a Path.

    Raises:
        FileNotFoundError: no model directory, no adapter directory, or an adapter file missing.
        ValueError: an unknown dtype; `out` equal to or inside the model or adapter directory, or an existing
            `out` that is not an empty directory; a model directory transformers cannot load; an adapter that
            does not fit the model, or whose weight to merge into is tied to another (a tied embedding and
            output head); a seq-cls adapter whose number of labels cannot be told; a merged weight that holds NaN
            or inf in `dtype` (nothing is written).
        OSError: the directory cannot be written.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir, adapter_dir = (Path(p).expanduser() for p in (model, adapter))
    if not model_dir.is_dir():  # a local directory only: a name that is not one is never looked up on the hub
        raise FileNotFoundError(f"no model directory at {model_dir}")
    raw = read_adapter_config(adapter_dir)
    lora = config_from_peft(raw, str(adapter_dir / CONFIG_NAME))  # a config lorakit cannot load: refused now
    shapes = tensor_shapes(adapter_dir)
    out = check_output(out, {"model": model_dir, "adapter": adapter_dir})  # as given: "" is no "."

    seq_cls = lora.task_type == "SEQ_CLS"
    labels = classifier_labels(adapter_dir, shapes) if seq_cls else None
    num_labels = len(labels) if labels is not None else None
    bits, run_dtype = training_quantization(adapter_dir, bits)
    task = "seq-cls" if seq_cls else "causal-lm"
    base, tokenizer = load_model_and_tokenizer(str(model_dir), task, num_labels, run_dtype, bits, keep=HEADS)
    take_run_chat_template(tokenizer, adapter_dir)  # the merged model chats as it was trained to
    base_config = read_json_object(model_dir / "config.json")
    target = DTYPES[dtype] if dtype is not None else own_dtype(base_config, base)
    if base.dtype != target and not bits:  # (a quantized base is merged in float32 by merge_and_unload)
        base.to(torch.float32)  # merged in float32, then rounded once to the target
    try:
        load_adapter(base, adapter_dir)
    except ValueError as error:
        raise ValueError(f"the adapter in {adapter_dir} does not fit the model in {model_dir}: {error}") from None
    merged = merge_and_unload(base, dequantize=bits is not None)  # a tied weight under it: its ValueError goes through
    merged.to(target)
    check_merged(merged, target)
    merged.eval()
    if hasattr(merged.config, "use_cache"):  # loading for training turned the cache off; serving wants it
        merged.config.use_cache = base_config.get("use_cache", True)
    if labels is not None:  # what pipeline("text-classification") prints for each class
        for key, value in label_config(labels).items():
            setattr(merged.config, key, value)
    with atomic_dir(out, commit="config.json") as tmp:  # what transformers reads first: the model is whole or absent
        save(merged, tokenizer, tmp)
    return out


def check_merged(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuses a merged model with a weight that holds NaN or inf, before anything is written: an adapter whose
    update is past the range of `dtype` (float16's largest is 65504), or a base that held such weights already.

    Raises:
        ValueError: the first such parameter, by name.
    """
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"not writing the merged model: {name} holds NaN or inf in {dtype}")


def training_quantization(adapter_dir: Path, bits: int | None) -> tuple[int | None, str | None]:
    """(bits, dtype) of the base the adapter was trained on: `bits` where given, else the run's own, from its
    train_config.json (--load-in-4bit, --load-in-8bit, --dtype); (None, None) for an unquantized base. The dtype is
    the one the run quantized its weights from, so that the same quantized weights load again."""
    if bits is not None and bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    try:
        run = saved_config(adapter_dir)
    except FileNotFoundError:
        return bits, None
    run_bits = 4 if run.get("load_in_4bit") else 8 if run.get("load_in_8bit") else None
    bits = run_bits if bits is None else bits
    return bits, run.get("dtype") if bits else None


def save(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """The model (weights as safetensors, config, generation config where it generates) and the tokenizer
    (with its chat template) into `directory`, without transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # safetensors only: transformers 5 writes nothing else, and the flag tells transformers 4 so;
        # save_pretrained writes generation_config.json itself for a model that generates
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # safetensors writes its files readable by their owner alone; a server running as another user could not
    # read them: they get the permissions of config.json, a plain open()'s under the process umask
    mode = stat.S_IMODE((directory / "config.json").stat().st_mode)
    for path in directory.rglob("*.safetensors"):
        path.chmod(mode)


def check_output(out: str | os.PathLike, inputs: dict[str, Path]) -> Path:
    """`out` as a Path, refused where it is empty, is, lies inside or contains one of the `inputs` ({what:
    directory}) or cannot be written (lorakit.io.outputs), or exists and is not an empty directory: an output never
    lands on an input, nor mixes with files already there."""
    out = check_output_path(out, [(f"{kind} directory", path) for kind, path in inputs.items()])
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: remove it or choose another --out")
    return out


def tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in the adapter's weights file, from its header alone."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        read_adapter_weights(adapter_dir)  # raises the FileNotFoundError that also names a pickle found instead
    with open_safetensors(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


def classifier_labels(adapter_dir: Path, shapes: dict[str, tuple[int, ...]]) -> list:
    """The labels of a seq-cls adapter, class i being labels[i]: those of labels.json beside it, else LABEL_0,
    LABEL_1, ... (transformers' own names) for each output of the classification head it saves (`shapes`: its
    tensors' shapes).

    Raises:
        ValueError: a bad labels.json; no labels.json and no single classification head to count the classes of.
    """
    labels = read_labels(adapter_dir)
    if labels is not None:
        return labels
    count = head_outputs(shapes)
    if count is None:
        raise ValueError(
            f"cannot tell the number of labels of the seq-cls adapter in {adapter_dir}: it saves no single "
            f"classifier or score layer; write its labels, as a JSON list, to {adapter_dir / LABELS_NAME}"
        )
    return [f"LABEL_{i}" for i in range(count)]


def head_outputs(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The number of outputs of the classification head saved in the adapter (the `classifier` / `score` copy):
    of its weight matrices, the one whose outputs no other one takes in (RoBERTa's head is dense, then
    out_proj). None where there is no head, or no single such matrix."""
    weights = []
    for key, shape in shapes.items():
        path = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        if key.endswith(".weight") and len(shape) == 2 and not is_factor_key(key) and within_target(HEADS, path):
            weights.append(shape)
    last = {rows for rows, _ in weights if not any(columns == rows for _, columns in weights)}
    return last.pop() if len(last) == 1 else None


def own_dtype(config: dict, model: nn.Module) -> torch.dtype:
    """The base model's dtype: as its config.json states it ("dtype", or "torch_dtype" before transformers 5),
    else as it loaded."""
    stated = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(stated, model.dtype) if isinstance(stated, str) else model.dtype
