"""SVD tools on adapters as stored: extract one from a fine-tuned model, resize it, combine several, look inside.

An adapter on disk (PEFT's format) is, per layer, two factors and a scale: ΔW = s · B A with B (out × r),
A (r × in). Everything here works on those factors, never on the full out × in ΔW (except `extract`, whose
input is a full ΔW): with QR decompositions B = Q_B R_B and Aᵀ = Q_A R_A,

    s · B A = Q_B (s · R_B R_Aᵀ) Q_Aᵀ = (Q_B U) Σ (Q_A V)ᵀ      where s · R_B R_Aᵀ = U Σ Vᵀ is only r × r,

which is the SVD of ΔW at the cost of two thin QRs (`factored_svd`). Truncating it gives the best lower-rank
adapter (Eckart–Young), and stacking factors ([B₁ | B₂], [A₁ ; A₂]) adds updates exactly.

    state = lk.extract(base_state, tuned_state, energy=0.9)     # a full fine-tune → an adapter
    small = lk.resize("adapter-dir", r=4)                        # optimal rank-4 version
    mix = lk.combine(["a", "b"], [0.7, 0.3], method="svd", r=8)  # one adapter from two
    state.save("out-dir")                                        # PEFT's format, atomically
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lorakit import lowrank
from lorakit.atomic import atomic_dir
from lorakit.config import check_positive_int, matches_target
from lorakit.files import (
    CONFIG_NAME,
    config_from_peft,
    open_safetensors,
    peft_config_dict,
    read_adapter_config,
    read_adapter_weights,
    read_json_object,
    write_adapter_files,
)
from lorakit.layers import is_conv1d
from lorakit.model import KEY_SUFFIXES, PEFT_PREFIX

__all__ = [
    "AdapterState",
    "LayerFactors",
    "TensorSource",
    "combine",
    "compare",
    "extract",
    "factored_svd",
    "inspect",
    "resize",
]

CombineMethod = Literal["svd", "cat", "linear"]
COMBINE_METHODS = get_args(CombineMethod)

# -- adapters as stored -----------------------------------------------------------------------------------


@dataclass
class LayerFactors:
    """One adapted layer: ΔW = scale · B A, with A and B flattened to 2-D (conv kernels into columns)."""

    path: str
    A: torch.Tensor  # (r × in)
    B: torch.Tensor  # (out × r)
    scale: float
    kind: str = "linear"  # "linear" (Linear, Conv1D, Conv) or "embedding": the file keys differ
    a_shape: tuple[int, ...] = ()  # stored shapes, to write conv factors back as they were
    b_shape: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def stored(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New 2-D factors of rank k back in this layer's stored layout."""
        k = A.shape[0]
        a_shape = (k, *self.a_shape[1:]) if self.a_shape else tuple(A.shape)
        b_shape = (self.b_shape[0], k, *self.b_shape[2:]) if self.b_shape else tuple(B.shape)
        return A.reshape(a_shape), B.reshape(b_shape)


@dataclass
class AdapterState:
    """An adapter without a model: PEFT's config dict and its tensors under PEFT's keys."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)  # what made it (errors, energy), saved beside it

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AdapterState:
        """A PEFT-format adapter directory, its config checked and its tensors read (safetensors only)."""
        directory = Path(directory)
        raw = read_adapter_config(directory)
        config_from_peft(raw, str(directory / CONFIG_NAME))  # validates it
        return cls(raw, read_adapter_weights(directory))

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes adapter_config.json, adapter_model.safetensors (and report.json if any), atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            write_adapter_files(tmp, self.config, self.tensors)
            if self.report:
                (tmp / "report.json").write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        return directory

    def layers(self) -> list[LayerFactors]:
        """The adapted layers, in file order, with their scales resolved from the config."""
        config = config_from_peft(self.config)
        found = []
        for key, A in self.tensors.items():
            parts = _a_key_parts(key)
            if parts is None:  # a B factor, taken with its A, or something else (refused below)
                continue
            kind, path, key_B = parts
            B = self.tensors.get(key_B)
            if B is None:
                raise ValueError(f"adapter has {key} but no {key_B}")
            _check_factors(key, A, key_B, B)
            r = A.shape[0]
            scale = config.scale_for(path, r)  # the stored rank decides, whatever the patterns say
            A2, B2 = A.reshape(r, -1), B.reshape(B.shape[0], r)  # conv factors as matrices
            found.append(LayerFactors(path, A2, B2, scale, kind, tuple(A.shape), tuple(B.shape)))
        if not found:
            raise ValueError("the adapter has no LoRA factors")
        extra = next((k for k in self.tensors if not _is_factor_key(k)), None)
        if extra is not None:
            raise ValueError(
                f"the adapter holds more than LoRA factors ({extra!r}: modules_to_save or biases); "
                "lorakit's SVD tools work on the factors alone"
            )
        return found


def _check_factors(key_A: str, A: torch.Tensor, key_B: str, B: torch.Tensor) -> None:
    """Refuses tensors that are not the two factors of one rank-r update: A (r × in ...), B (out × r [× 1 ...]),
    r ≥ 1, all finite."""
    r = A.shape[0] if A.dim() >= 2 else 0
    if r == 0 or B.dim() < 2 or B.shape[1] != r or B[0].numel() != r:
        raise ValueError(
            f"{key_A} {tuple(A.shape)} and {key_B} {tuple(B.shape)} are not the two factors of one rank-r update"
        )
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"{key_A} or {key_B} holds NaN or inf")


def _a_key_parts(key: str) -> tuple[str, str, str] | None:
    """(layer kind, layer path, its B factor's key) where `key` is an A factor's key; None otherwise."""
    for kind, (a_suffix, b_suffix) in KEY_SUFFIXES.items():
        if key.endswith("." + a_suffix):
            stem = key[: -len(a_suffix) - 1]
            return kind, stem.removeprefix(PEFT_PREFIX), f"{stem}.{b_suffix}"
    return None


def _is_factor_key(key: str) -> bool:
    return key.endswith(tuple(s for pair in KEY_SUFFIXES.values() for s in pair))


def _as_state(adapter: str | os.PathLike | AdapterState) -> AdapterState:
    return adapter if isinstance(adapter, AdapterState) else AdapterState.load(adapter)


def state_from_layers(
    layers: Sequence[LayerFactors], factors: dict[str, tuple[torch.Tensor, torch.Tensor]], template: dict[str, Any]
) -> AdapterState:
    """An adapter whose layer `path` has 2-D factors `factors[path]` at scale 1 (α = r for every layer)."""
    tensors, ranks = {}, {}
    for layer in layers:
        A, B = layer.stored(*factors[layer.path])
        a_suffix, b_suffix = KEY_SUFFIXES[layer.kind]
        tensors[f"{PEFT_PREFIX}{layer.path}.{a_suffix}"] = A
        tensors[f"{PEFT_PREFIX}{layer.path}.{b_suffix}"] = B
        ranks[layer.path] = A.shape[0]
    r = max(ranks.values())
    # "^": a pattern key matches a path's end at a "." (PEFT and lorakit alike), so "fc" would also pick "block.fc"
    patterns = {f"^{re.escape(path)}": k for path, k in ranks.items() if k != r}
    config = peft_config_dict(
        task_type=template.get("task_type"),
        base_model_name_or_path=template.get("base_model_name_or_path"),
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        lora_dropout=template.get("lora_dropout", 0.0),
        fan_in_fan_out=template.get("fan_in_fan_out", False),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),  # α = r everywhere: every scale is 1
    )
    return AdapterState(config, tensors)


# -- the factored SVD -----------------------------------------------------------------------------------


def factored_svd(
    B: torch.Tensor, A: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of scale · B A from B (out × r) and A (r × in), never forming out × in.

    S holds min(out, in, r) singular values, U is out × that and Vh that × in: r may exceed out or in.
    """
    B, A = B.double(), A.double()
    Q_B, R_B = torch.linalg.qr(B)  # (out × k), (k × r), k = min(out, r)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (in × k'), (k' × r), k' = min(in, r)
    U, S, Vh = torch.linalg.svd(scale * R_B @ R_A.mT, full_matrices=False)  # the thin SVD of the k × k' core
    return Q_B @ U, S, Vh @ Q_A.mT


def truncated_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank k, √Σ on each side, at scale 1."""
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


def frobenius_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = trace((B₁ᵀB₂)(A₂A₁ᵀ)) from r × r products only."""
    return float(((B1.double().mT @ B2.double()) * (A1.double() @ A2.double().mT)).sum())


def check_rank_or_energy(r: int | None, energy: float | None) -> None:
    """Exactly one of a positive integer rank or an energy fraction in (0, 1], checked before any work."""
    if (r is None) == (energy is None):
        raise ValueError("give exactly one of a rank or an energy fraction")
    if r is not None:
        check_positive_int("rank", r)
    elif not 0 < energy <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {energy}")


def chosen_rank(S: torch.Tensor | None, limit: int, r: int | None, energy: float | None, where: str) -> int:
    """The rank for one layer (arguments already through `check_rank_or_energy`): `r`, refused above `limit`
    (what `where` allows), or the smallest rank holding `energy` of ‖ΔW‖²_F by its singular values S."""
    if r is not None:
        if r > limit:
            raise ValueError(f"rank {r} is larger than {where} allows (at most {limit})")
        return r
    return max(1, lowrank.rank_for_energy_of_spectrum(S, energy))


def energy_kept(S: torch.Tensor, k: int) -> float:
    """The fraction of ‖ΔW‖²_F that the top k of its singular values S hold (all of it for k ≥ len(S))."""
    curve = lowrank.energy_of_spectrum(S.double())
    return float(curve[min(k, curve.numel()) - 1])


# -- extraction --------------------------------------------------------------------------------------------


class TensorSource:
    """Named tensors from a state dict, a .safetensors file or a model directory (one file, or shards with
    an index), read one at a time so that a large model never sits in memory whole."""

    def __init__(self, source: str | os.PathLike | dict[str, torch.Tensor]):
        self.memory = source if isinstance(source, dict) else None
        if self.memory is not None:
            return
        self.path = Path(source)
        if self.path.is_dir():
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                self.files = _shards(index)
            else:
                files = sorted(self.path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"{self.path} holds no .safetensors weights")
                self.files = {key: f for f in files for key in _keys(f)}
        elif self.path.is_file():
            self.files = {key: self.path for key in _keys(self.path)}
        else:
            raise FileNotFoundError(f"no such file or directory: {self.path}")

    def names(self) -> list[str]:
        return list(self.memory if self.memory is not None else self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.memory is not None:
            return tuple(self.memory[key].shape)
        with open_safetensors(self.files[key]) as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[key]
        with open_safetensors(self.files[key]) as f:
            return f.get_tensor(key)


def _keys(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def _shards(index: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a model.safetensors.index.json, with every shard it names opened and
    checked to hold the tensors the index puts there (reading headers only)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f'{index} has no "weight_map" object of tensor names to shard files')
    outside = [name for name in weight_map.values() if Path(name).name != name]
    if outside:
        raise ValueError(f"{index} names a shard outside its directory: {outside[0]!r}")
    files = {key: index.parent / name for key, name in weight_map.items()}
    held = {shard: set(_keys(shard)) for shard in dict.fromkeys(files.values())}
    for key, shard in files.items():
        if key not in held[shard]:
            raise ValueError(f"{index} puts {key!r} in {shard.name}, which does not hold it")
    return files


def _meta_model(model_dir: Path) -> nn.Module | None:
    """The transformers model a directory's config.json describes, built on the meta device (no memory, no
    weights), or None where there is no config or transformers cannot build it."""
    if not (model_dir.is_dir() and (model_dir / "config.json").is_file()):
        return None
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        if architecture is None:
            return None
        with torch.device("meta"):
            return architecture._from_config(config)
    except Exception:  # whatever transformers raises on a config it cannot build: nothing known
        return None


def module_kinds(model: nn.Module | None) -> dict[str, str]:
    """{module path: "linear" | "conv1d" | "embedding"} of a model (`_meta_model`'s); {} for None."""
    kinds = {}
    for name, module in model.named_modules() if model is not None else []:
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif is_conv1d(module):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
    return kinds


def tied_embedding(model: nn.Module | None) -> str | None:
    """The path of the input embedding that a transformers model (`_meta_model`'s) ties to its output head, or
    None. Its checkpoint holds the shared weight once, under the embedding's name."""
    if model is None:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return None
    return next(name for name, module in model.named_modules() if module is embedding)


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
    """
    check_rank_or_energy(r, energy)
    # the models the two describe where they are model directories (BASE may be a bare .safetensors file)
    models = [_meta_model(Path(x)) for x in (base, tuned) if isinstance(x, str | os.PathLike)]
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
        A, B = truncated_factors(U, S, Vh, k)
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


# -- resize and combine ----------------------------------------------------------------------------------


def resize(
    adapter: str | os.PathLike | AdapterState, r: int | None = None, energy: float | None = None
) -> AdapterState:
    """The best adapter of rank r (or of the rank holding `energy` of each layer's ‖ΔW‖²_F), per layer,
    from the factors alone. Ranks above what a layer's ΔW can have, min(out, in, current rank), are refused
    (they add nothing)."""
    check_rank_or_energy(r, energy)
    state = _as_state(adapter)
    layers = state.layers()
    factors, report = {}, {"layers": {}}
    for layer in layers:
        U, S, Vh = factored_svd(layer.B, layer.A, layer.scale)
        where = f"layer {layer.path} ({layer.B.shape[0]} × {layer.A.shape[1]}, rank {layer.rank})"
        k = chosen_rank(S, S.numel(), r, energy, where)
        A, B = truncated_factors(U, S, Vh, k)
        factors[layer.path] = (A.to(layer.A.dtype), B.to(layer.B.dtype))
        kept = energy_kept(S, k)
        report["layers"][layer.path] = {
            "rank_before": layer.rank,
            "rank": k,
            "relative_error": math.sqrt(max(0.0, 1 - kept)),
            "energy_kept": kept,
        }
    result = state_from_layers(layers, factors, state.config)
    result.report = report
    return result


def combine(
    adapters: Sequence[str | os.PathLike | AdapterState],
    weights: Sequence[float] | None = None,
    method: CombineMethod = "svd",
    r: int | None = None,
) -> AdapterState:
    """One adapter for Σ wᵢ ΔWᵢ, per layer (a layer missing from an adapter counts as ΔW = 0 there).

    "cat": exact, stacking [w₁s₁B₁ | w₂s₂B₂ | …] and [A₁ ; A₂ ; …] (rank = sum of ranks);
    "svd": the best rank-r fit of the sum (default r: the largest input rank), through `factored_svd`;
    "linear": Σ √|wᵢsᵢ| Aᵢ and Σ ±√|wᵢsᵢ| Bᵢ, for equal ranks: cheap, but its cross terms make it inexact.
    The report gives each layer's relative Frobenius error against the exact sum.
    """
    if len(adapters) < 2:
        raise ValueError("combine needs at least two adapters")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if r is not None:
        if method != "svd":
            raise ValueError(f"a rank only applies to method 'svd', not {method!r}")
        check_positive_int("rank", r)
    states = [_as_state(a) for a in adapters]
    per_adapter = [{layer.path: layer for layer in s.layers()} for s in states]
    paths = list(dict.fromkeys(path for layers in per_adapter for path in layers))
    out_layers, factors, report = [], {}, {"method": method, "weights": weights, "layers": {}}
    for path in paths:
        present = [(w, layers[path]) for w, layers in zip(weights, per_adapter, strict=True) if path in layers]
        _check_same_shapes(path, [layer for _, layer in present])
        # the exact sum as stacked factors, each term at scale w·s
        A_cat = torch.cat([layer.A.double() for _, layer in present])
        B_cat = torch.cat([w * layer.scale * layer.B.double() for w, layer in present], dim=1)
        if method == "cat":
            A, B, error = A_cat, B_cat, 0.0
        elif method == "svd":
            U, S, Vh = factored_svd(B_cat, A_cat)
            k = min(r or max(layer.rank for _, layer in present), S.numel())
            A, B = truncated_factors(U, S, Vh, k)
            error = math.sqrt(max(0.0, 1 - energy_kept(S, k)))
        else:
            ranks = {layer.rank for _, layer in present}
            if len(ranks) != 1:
                raise ValueError(f"method 'linear' needs equal ranks; layer {path} has ranks {sorted(ranks)}")
            A = sum(math.sqrt(abs(w * layer.scale)) * layer.A.double() for w, layer in present)
            B = sum(
                math.copysign(math.sqrt(abs(w * layer.scale)), w * layer.scale) * layer.B.double()
                for w, layer in present
            )
            error = relative_difference(B, A, B_cat, A_cat)
        first = present[0][1]
        out_layers.append(first)
        factors[path] = (A.to(first.A.dtype), B.to(first.B.dtype))
        report["layers"][path] = {"rank": A.shape[0], "relative_error": error}
    result = state_from_layers(out_layers, factors, states[0].config)
    result.report = report
    return result


def _check_same_shapes(path: str, layers: list[LayerFactors]) -> None:
    shapes = {(layer.B.shape[0], layer.A.shape[1], layer.kind) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"layer {path} has different shapes in the adapters: {sorted(shapes)}")


def relative_difference(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """‖B₁A₁ − B₂A₂‖_F / ‖B₂A₂‖_F, from r × r products only."""
    d2 = frobenius_inner(B1, A1, B1, A1) - 2 * frobenius_inner(B1, A1, B2, A2) + frobenius_inner(B2, A2, B2, A2)
    reference = frobenius_inner(B2, A2, B2, A2)
    return math.sqrt(max(d2, 0.0) / reference) if reference > 0 else math.sqrt(max(d2, 0.0))


# -- looking inside ----------------------------------------------------------------------------------------


def rounding_tolerance(layer: LayerFactors) -> float:
    """How far rounding B and A to their stored dtype can have moved any singular value of ΔW = s·B·A:
    |s| · eps · (‖B‖_F ‖A‖₂ + ‖B‖₂ ‖A‖_F), eps of that dtype (a bound, by Weyl, with a factor 2 to spare).

    numpy's rule with that eps, σ_max · max(out, in) · eps, passes σ_max for bfloat16 once a side reaches 128
    (every adapter would have rank 0); this grows with the factors' norms, not with the layer's size.
    """
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in (layer.A, layer.B))
    A, B = layer.A.double(), layer.B.double()
    norm = torch.linalg.matrix_norm  # Frobenius by default, spectral with ord=2
    return abs(layer.scale) * eps * float(norm(B) * norm(A, 2) + norm(B, 2) * norm(A))


def inspect(adapter: str | os.PathLike | AdapterState) -> Iterator[dict[str, Any]]:
    """Per layer: r, α, scale, the singular values of ΔW (from the factors), numerical and effective rank,
    and the energy curve.

    The numerical rank counts the singular values that stand above both the float64 round-off of computing
    them (numpy's rule) and what storing the factors in their dtype may have added (`rounding_tolerance`).
    """
    state = _as_state(adapter)
    config = config_from_peft(state.config)
    for layer in state.layers():
        _, S, _ = factored_svd(layer.B, layer.A, layer.scale)  # in float64, whatever the factors' dtype
        shape = (layer.B.shape[0], layer.A.shape[1])
        tol = max(lowrank.default_tolerance(S, shape), rounding_tolerance(layer))
        yield {
            "layer": layer.path,
            "shape": list(shape),
            "r": layer.rank,
            "alpha": config.alpha_for(layer.path),
            "scale": layer.scale,
            "singular_values": S.tolist(),
            "rank": lowrank.rank_of_spectrum(S, shape, tol),
            "effective_rank": lowrank.effective_rank_of_spectrum(S),
            "energy": lowrank.energy_of_spectrum(S).tolist(),
        }


def compare(
    first: str | os.PathLike | AdapterState, second: str | os.PathLike | AdapterState
) -> Iterator[dict[str, Any]]:
    """Per layer the two adapters share: the subspace similarity φ(i, j) of their A matrices for every
    i ≤ r₁, j ≤ r₂ (LoRA paper, section 7) and the cosine similarity of the two ΔW."""
    one = {layer.path: layer for layer in _as_state(first).layers()}
    two = {layer.path: layer for layer in _as_state(second).layers()}
    common = [path for path in one if path in two]
    if not common:
        raise ValueError("the two adapters share no layer")
    for path in common:
        a, b = one[path], two[path]
        _check_same_shapes(path, [a, b])
        phi = lowrank.subspace_similarities(a.A, b.A).tolist()  # one SVD per adapter gives every φ(i, j)
        inner = frobenius_inner(a.scale * a.B, a.A, b.scale * b.B, b.A)
        norms = math.sqrt(frobenius_inner(a.scale * a.B, a.A, a.scale * a.B, a.A)) * math.sqrt(
            frobenius_inner(b.scale * b.B, b.A, b.scale * b.B, b.A)
        )
        yield {"layer": path, "r1": a.rank, "r2": b.rank, "phi": phi, "cosine": inner / norms if norms else 0.0}
