"""A fully fine-tuned model as a LoRA adapter: the truncated SVD of each ΔW = W_tuned − W_base.

state = lk.extract("base-model/", "tuned-model/", energy=0.9)
state.save("extracted/")
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from lorakit import lowrank
from lorakit.engine.config import matches_target
from lorakit.tools.sources import TensorSource, meta_model, module_kinds, tied_embedding
from lorakit.tools.stored import AdapterState, LayerFactors, check_rank_or_energy, chosen_rank, state_from_layers

__all__ = ["extract"]


def extract(
    base: str | os.PathLike | dict[str, torch.Tensor] | TensorSource,
    tuned: str | os.PathLike | dict[str, torch.Tensor] | TensorSource,
    r: int | None = None,
    energy: float | None = None,
    targets: list[str] | str | None = None,
    kinds: dict[str, str] | None = None,
) -> AdapterState:
    """A LoRA adapter that approximates a full fine-tune: the truncated SVD of ΔW = W_tuned − W_base.

    `base` / `tuned`: state dicts, .safetensors files or model directories (sharded ones included). Every
    2-D weight that differs becomes a layer, with rank `r` or the smallest rank holding `energy` of
    ‖ΔW‖²_F; `targets` (names or a regex, as in LoraConfig) narrows the layers. `kinds` tells which
    modules are Embedding or transformers Conv1D (read from BASE's or TUNED's model directory, whichever is
    one; without either, every weight is read as a Linear's, out × in).
    At a fixed rank, large layers use the randomized SVD (`lowrank.truncated_svd(method="auto")`).
    The report holds each layer's rank, relative Frobenius error (measured) and energy kept.

    Args:
        base: the model before fine-tuning: a state dict, a .safetensors file or a model directory.
        tuned: the fine-tuned model, in any of the same forms; every tensor it has, `base` must have too, in the
            same shape.
        r: the rank of every layer, at most min(out, in) of each. Exactly one of `r` and `energy`.
        energy: the fraction of each layer's ‖ΔW‖²_F to keep, in (0, 1]; each layer gets the smallest rank
            that holds it, at least 1.
        targets: names or a regex, as in LoraConfig, for the layers to extract (None: every changed weight).
        kinds: {module path: "linear" | "conv1d" | "embedding"} (None: read from the model directories, as
            above).

    Returns:
        The adapter, every layer at scale 1 (α = r). Its report holds, under "layers", each layer's shape,
        rank, relative error and energy kept; "unchanged", the number of equal tensors; "other_changed", the
        changed tensors that became no layer (not 2-D floating-point weights, or not among the targets).

    Raises:
        ValueError: both or neither of `r` and `energy`, or a bad value of either; `r` above a layer's
            min(out, in); a tensor of TUNED that BASE lacks or has in another shape; a ΔW with NaN or inf; no
            2-D floating-point weight that differs (among the targets); an unreadable .safetensors file or
            shard index.
        FileNotFoundError: `base` or `tuned` is a path to nothing, or a directory without .safetensors files.

    Warns:
        UserWarning: an extracted embedding is tied to the model's output head: the adapter changes the lookup
            alone, so the adapted model's outputs differ from TUNED's.
    """
    check_rank_or_energy(r, energy)
    # the models the two describe where they are model directories (BASE may be a bare .safetensors file)
    models = [meta_model(Path(x)) for x in (base, tuned) if isinstance(x, str | os.PathLike)]
    if kinds is None:  # from whichever of the two is a model directory
        kinds = next((found for found in map(module_kinds, models) if found), {})
    tied = {path for path in map(tied_embedding, models) if path is not None}
    base_src, tuned_src = (x if isinstance(x, TensorSource) else TensorSource(x) for x in (base, tuned))
    base_names = set(base_src.names())
    missing = [k for k in tuned_src.names() if k not in base_names]
    if missing:
        raise ValueError(f"TUNED has {len(missing)} tensor(s) BASE lacks, e.g. {missing[0]!r}: not the same model")
    layers, factors, report = [], {}, {"layers": {}, "unchanged": 0, "other_changed": []}
    for key in tuned_src.names():
        if base_src.shape(key) != tuned_src.shape(key):
            raise ValueError(
                f"{key} has shape {base_src.shape(key)} in BASE but {tuned_src.shape(key)} in TUNED: not the same model"
            )
        w_base, w_tuned = base_src.get(key), tuned_src.get(key)
        if torch.equal(w_base, w_tuned):
            report["unchanged"] += 1
            continue
        path, _, leaf = key.rpartition(".")
        factorable = w_base.dim() == 2 and leaf == "weight" and w_base.is_floating_point()  # not integer buffers
        if not factorable or (targets is not None and not matches_target(targets, path)):
            report["other_changed"].append(key)
            continue
        kind = kinds.get(path, "linear")
        delta = w_tuned.double() - w_base.double()
        if kind in ("embedding", "conv1d"):
            delta = delta.mT  # as the update's (out × in): Embedding's ΔW = (BA)ᵀ, Conv1D stores (in × out)
        shape = tuple(delta.shape)
        where = f"layer {path} ({shape[0]} × {shape[1]})"
        delta = lowrank.as_matrix(delta, f"the update of {where}")  # refuses NaN or inf before any SVD
        if energy is not None:  # the rank depends on the whole spectrum: one full SVD serves both
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            k = chosen_rank(S, min(shape), r, energy, where)
            U, S, Vh = U[:, :k], S[:k], Vh[:k]
        else:  # randomized for big layers and small ranks: its error is measured and reported below
            k = chosen_rank(None, min(shape), r, energy, where)
            U, S, Vh = lowrank.truncated_svd(delta, k, method="auto")
        A, B = lowrank.truncated_factors(U, S, Vh, k)
        error = float(torch.linalg.matrix_norm(delta - B @ A)) / max(float(torch.linalg.matrix_norm(delta)), 1e-300)
        total = float(delta.square().sum())
        layers.append(LayerFactors(path, A, B, 1.0, "embedding" if kind == "embedding" else "linear"))
        if path in tied:
            warnings.warn(
                f"{path} shares its weight with the model's output head (tied embeddings): an adapter changes the "
                "lookup alone, so the adapted model's outputs will differ from TUNED's",
                stacklevel=2,
            )
        factors[path] = (A.to(w_base.dtype), B.to(w_base.dtype))
        report["layers"][path] = {
            "shape": list(shape),
            "rank": k,
            "relative_error": error,
            "energy_kept": 1.0 if total == 0 else float(S.square().sum()) / total,
        }
    if not layers:
        among = " among the targets" if targets is not None else ""
        raise ValueError(f"no 2-D floating-point weight differs between BASE and TUNED{among}")
    state = state_from_layers(layers, factors, {"fan_in_fan_out": any(v == "conv1d" for v in kinds.values())})
    state.report = report
    return state
