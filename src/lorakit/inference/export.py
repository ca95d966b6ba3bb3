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

import json
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
from lorakit.training.models import load_model_and_tokenizer, take_run_chat_template

__all__ = ["DTYPES", "LABELS_NAME", "merge_to_directory"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LABELS_NAME = "labels.json"  # beside a seq-cls adapter: class i is labels[i] (lorakit finetune writes it)
HEADS = ["classifier", "score"]  # the classification heads of transformers' sequence-classification models


def merge_to_directory(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
) -> Path:
    """Writes the base model with the adapter folded into its weights as a transformers model directory.

    The model class follows the adapter's task_type: "SEQ_CLS" loads a sequence-classification model (its
    number of labels from labels.json beside the adapter, which also names them in the config's id2label and
    label2id, or else from the classification head saved in the adapter), any other a causal LM. The weights
    are merged in the output dtype, or in float32 where the base loads in another dtype, so that each is
    rounded once. The config and tokenizer are saved as fine-tuning used them (a tokenizer without a pad token
    pads with its eos), with the base's own `use_cache`.

    The write is atomic: everything goes to a temporary directory beside `out` first, so a failure at any
    point leaves no `out` behind (and an existing empty `out` empty).

    Args:
        model: the base model's local transformers directory (config.json, safetensors weights, tokenizer).
        adapter: a PEFT-format adapter directory trained on that model (adapter_config.json and
            adapter_model.safetensors).
        out: the directory to write: new, or empty; never the model or adapter directory or inside them.
        dtype: the weights' dtype, "float32", "bfloat16" or "float16" (None: the base model's own, as its
            config.json states it, else as it loads).

    Returns:
        `out`, as a Path.

    Raises:
        FileNotFoundError: no model directory, no adapter directory, or an adapter file missing.
        ValueError: an unknown dtype; `out` equal to or inside the model or adapter directory, or an existing
            `out` that is not an empty directory; a model directory transformers cannot load; an adapter that
            does not fit the model, or whose weight to merge into is tied to another (a tied embedding and
            output head); a seq-cls adapter whose number of labels cannot be told.
        OSError: the directory cannot be written.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir, adapter_dir, out = (Path(p).expanduser() for p in (model, adapter, out))
    if not model_dir.is_dir():  # a local directory only: a name that is not one is never looked up on the hub
        raise FileNotFoundError(f"no model directory at {model_dir}")
    raw = read_adapter_config(adapter_dir)
    lora = config_from_peft(raw, str(adapter_dir / CONFIG_NAME))  # a config lorakit cannot load: refused now
    shapes = tensor_shapes(adapter_dir)
    check_output(out, {"model": model_dir, "adapter": adapter_dir})

    seq_cls = lora.task_type == "SEQ_CLS"
    labels = read_labels(adapter_dir) if seq_cls else None
    num_labels = None
    if seq_cls:
        num_labels = len(labels) if labels is not None else head_outputs(shapes)
        if num_labels is None:
            raise ValueError(
                f"cannot tell the number of labels of the seq-cls adapter in {adapter_dir}: it saves no single "
                f"classifier or score layer; write its labels, as a JSON list, to {adapter_dir / LABELS_NAME}"
            )
    base, tokenizer = load_model_and_tokenizer(str(model_dir), "seq-cls" if seq_cls else "causal-lm", num_labels)
    take_run_chat_template(tokenizer, adapter_dir)  # the merged model chats as it was trained to
    base_config = read_json_object(model_dir / "config.json")
    target = DTYPES[dtype] if dtype is not None else own_dtype(base_config, base)
    if base.dtype != target:
        base.to(torch.float32)  # merged in float32, then rounded once to the target
    try:
        load_adapter(base, adapter_dir)
    except ValueError as error:
        raise ValueError(f"the adapter in {adapter_dir} does not fit the model in {model_dir}: {error}") from None
    merged = merge_and_unload(base)  # a tied weight under the adapter: its one-line ValueError goes through
    merged.to(target)
    merged.eval()
    if hasattr(merged.config, "use_cache"):  # loading for training turned the cache off; serving wants it
        merged.config.use_cache = base_config.get("use_cache", True)
    if labels is not None:
        merged.config.id2label = {i: str(label) for i, label in enumerate(labels)}
        merged.config.label2id = {str(label): i for i, label in enumerate(labels)}
    with atomic_dir(out) as tmp:
        save(merged, tokenizer, tmp)
    return out


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


def check_output(out: Path, inputs: dict[str, Path]) -> None:
    """Refuses an `out` that is or lies inside one of the `inputs` ({what: directory}), and an existing one that
    is not an empty directory: an output never lands on an input, nor mixes with files already there."""
    where = out.resolve()
    for kind, path in inputs.items():
        source = path.resolve()
        if where == source or source in where.parents:
            place = f"the {kind} directory" if where == source else f"inside the {kind} directory {path}"
            raise ValueError(f"--out {out} is {place}: choose an --out outside the inputs")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: remove it or choose another --out")


def tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in the adapter's weights file, from its header alone."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        read_adapter_weights(adapter_dir)  # raises the FileNotFoundError that also names a pickle found instead
    with open_safetensors(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


def read_labels(adapter_dir: Path) -> list | None:
    """The labels in labels.json beside the adapter (class i is labels[i]), or None where there is no file."""
    path = adapter_dir / LABELS_NAME
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(labels, list) or len(labels) < 2 or len({str(label) for label in labels}) != len(labels):
        raise ValueError(f"{path} must hold a JSON list of at least two different labels")
    return labels


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
