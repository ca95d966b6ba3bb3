"""Loading the model and tokenizer a run fine-tunes, with transformers, from a local directory (or the hub)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.training.quantize import map_large_allocations, quantize_linears

__all__ = [
    "CHAT_TEMPLATE_NAME",
    "encoder_only_type",
    "load_model_and_tokenizer",
    "local_model_dir",
    "max_positions",
    "take_run_chat_template",
]

CHAT_TEMPLATE_NAME = "chat_template.jinja"  # beside the adapter of a run trained with --chat-template

HUB_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")  # "gpt2", "owner/name"


def local_model_dir(name: str) -> Path | None:
    """The local directory `name` stands for, or None where it stands for a model on the Hugging Face hub.

    A name that exists on disk, starts with ".", "/" or "~" (the home directory), or cannot be a hub id
    ("name" or "owner/name" of letters, digits, "_", "-" and ".") is a local path; any other is a hub id.
    Nothing here touches the network.
    """
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        return path
    return None


def encoder_only_type(path: str) -> str | None:
    """The model type of the model at `path` where it is encoder-only (bert, roberta, deberta-v2, ...): it reads a
    whole text at once and was trained to fill in masked words, not to continue a text; None for any other model,
    or a config transformers cannot read (loading the model then says why)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    local = local_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path if local is None else str(local))
    except Exception:  # whatever transformers raises on a directory it cannot read
        return None
    # BERT-like families have a causal-LM class too, usable only with is_decoder=True in their config
    decoder = getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False)
    return config.model_type if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not decoder else None


def load_model_and_tokenizer(
    path: str,
    task: str,
    num_labels: int | None,
    dtype: str | None = None,
    bits: int | None = None,
    keep: Sequence[str] = (),
) -> tuple[nn.Module, Any]:
    """A transformers model and its tokenizer from a local directory (or a hub name, where there is network), the
    weights in `dtype` ("float32", "bfloat16", "float16"; None: the dtype its config states, else its weights').

    With `bits` (4 or 8), the linear layers but the output head and the modules in `keep` are quantized by
    bitsandbytes, one at a time as the weights are read (lorakit.training.quantize), the 4-bit ones computing in
    `dtype`, and glibc's allocator maps every block from 128 KiB on for the rest of the process
    (`map_large_allocations`), so that memory is what QLoRA saves."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local = local_model_dir(path)
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    if local is not None and not (local / "config.json").is_file():
        raise ValueError(f"{path} is not a transformers model directory (no config.json)")
    source = path if local is None else str(local)
    if bits:  # from here on: the steps' activations must not pile up in glibc's heap (lorakit.training.quantize)
        map_large_allocations()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here: LoRA trains it
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # safetensors only: a pytorch_model.bin is a pickle, which can run code when it is read;
        # torch_dtype: what transformers 4.50 to 5 all read ("dtype" came in 4.56)
        # quantized: loaded as stored (mapped from the file, not converted) and quantized from there
        loading = {"use_safetensors": True, "torch_dtype": getattr(torch, dtype) if dtype and not bits else "auto"}
        if task == "seq-cls":
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **loading)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **loading)
    except Exception as error:  # transformers raises many kinds; each means this directory is bad
        message = " ".join(str(error).split()) or type(error).__name__  # one line, even from a multi-line error
        raise ValueError(f"cannot load the model or tokenizer from {path}: {message}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if bits:
        quantize_linears(model, bits, getattr(torch, dtype) if dtype else None, keep)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, tokenizer


def max_positions(model: nn.Module, tokenizer: Any) -> int | None:
    """The most tokens the model takes in one text: its position table's size, or the tokenizer's limit where
    that is smaller (RoBERTa's table holds two extra rows), or None where neither says."""
    # an unset model_max_length is a huge placeholder (transformers' VERY_LARGE_INTEGER)
    found = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in found if isinstance(n, int) and 0 < n < 10**9]
    return min(limits) if limits else None


def take_run_chat_template(tokenizer: Any, adapter_dir: str | Path) -> None:
    """Gives the tokenizer the chat template a run was trained with (`--chat-template`, saved beside its adapter),
    so that prompts are rendered as the training data was; a run without one leaves the tokenizer's own."""
    path = Path(adapter_dir) / CHAT_TEMPLATE_NAME
    if path.is_file():
        tokenizer.chat_template = path.read_text(encoding="utf-8")
