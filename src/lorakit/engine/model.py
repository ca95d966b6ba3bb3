"""Model surgery: put adapters into any PyTorch model, switch, merge and remove them.

`inject` replaces each target module, in place, by a LoRA layer (lorakit.layers) that keeps the original
as `.base`; every other parameter is frozen. The adapters' configs live on the model itself
(lorakit.engine.state), so a model carries everything needed to save it.

    model = lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    lk.parameter_counts(model)        # (trainable, total)
    with lk.disabled(model): ...      # the base model alone
    lk.merge(model); lk.unmerge(model)
    plain = lk.merge_and_unload(model)
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.engine import dora, fused
from lorakit.engine.config import ALL_LINEAR, LoraConfig, is_svd_init, matches_target, within_target
from lorakit.engine.layers import (
    LoraEmbedding,
    LoraLayer,
    ModuleCopies,
    PerSampleRouting,
    is_conv1d,
    wrap_module,
)
from lorakit.engine.parameters import parameter_layers
from lorakit.engine.peft_format import (
    FLOAT_TYPES,
    bias_key,
    factor_keys,
    lora_bias_key,
    magnitude_key,
    module_key,
    token_rows_key,
)
from lorakit.engine.quantized import dequantize_linears, parameter_numel
from lorakit.engine.state import drop_state, read_state, write_state
from lorakit.engine.svd_init import check_svd_init, initialise_from_weight
from lorakit.engine.tokens import TrainableTokens, token_targets
from lorakit.io.untrusted import check_memory

__all__ = [
    "BASE",
    "adapter_names",
    "adapter_parameters",
    "delete_adapter",
    "disabled",
    "find_targets",
    "forward_per_sample",
    "inject",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "parameter_counts",
    "per_sample",
    "set_adapter",
    "trained_biases",
    "unload",
    "unmerge",
]

BASE = "__base__"  # in forward_per_sample: this sample uses no adapter
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
MAX_NAMES_SHOWN = 10


# -- looking around a model -------------------------------------------------------------------------


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the model's adapters, by name (an empty dict for a plain model). Read only."""
    return read_state(model).configs


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def module_copies(model: nn.Module) -> Iterator[tuple[str, ModuleCopies]]:
    for name, module in model.named_modules():
        if isinstance(module, ModuleCopies):
            yield name, module


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokens]]:
    """(path, wrapper) for every module with trainable token rows (trainable_token_indices)."""
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokens):
            yield name, module


def peft_path(model: nn.Module, path: str) -> str:
    """PEFT's name of module `path`: a LoRA layer inside another one (nn.MultiheadAttention's out_proj, a
    module's second targeted parameter) sits in that one's `base`, which PEFT calls `base_layer`."""
    parts, module = [], model
    for part in path.split("."):
        parts.append("base_layer" if part == "base" and isinstance(module, LoraLayer) else part)
        module = getattr(module, part)
    return ".".join(parts)


def is_nested(model: nn.Module, path: str) -> bool:
    """Whether LoRA layer `path` sits inside another LoRA layer."""
    parts = path.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:end])), LoraLayer) for end in range(1, len(parts)))


def candidate_modules(model: nn.Module, prefix: str = "", into_copies: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Every named module a config can target, in order: wrappers count as their path, insides are skipped;
    with into_copies, the original inside each modules_to_save wrapper is walked too (a model without the
    wrappers has those modules)."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if isinstance(child, ModuleCopies) and into_copies:
            yield from candidate_modules(child.original, name, into_copies)
        elif not isinstance(child, LoraLayer | ModuleCopies | TrainableTokens):
            yield from candidate_modules(child, name, into_copies)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoraLayer) else module


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer (transformers' `get_output_embeddings`), which "all-linear" leaves alone."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (AttributeError, NotImplementedError):
            return None
    return None


def weights_read_directly(model: nn.Module) -> set[str]:
    """Paths of Linear layers whose parent reads their weight itself instead of calling them: an adapter there
    would never run. (nn.MultiheadAttention's out_proj: its forward passes out_proj.weight to a function.)"""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def refuse_tied(model: nn.Module, paths: list[str], why: str) -> None:
    """Refuses to rewrite the base weight of module `path` where the model also uses that weight under another
    name (a tied embedding and output head): `why` says what would happen and what to do instead."""
    for path in paths:
        weight = model.get_submodule(path).weight  # a LoRA layer's: the one its adapters update
        names = model.named_parameters(remove_duplicate=False)
        others = [n for n, p in names if p is weight and not n.startswith(f"{path}.")]
        if others:
            raise ValueError(f"{path}.weight is tied to {others[0]}: {why}")


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The paths of the modules `config` puts adapters on; a clear error when there are none."""
    head, never_called = output_head(model), weights_read_directly(model)
    found = []
    for name, module in candidate_modules(model):
        base = _unwrapped(module)
        if config.target_modules == ALL_LINEAR:
            hit = (isinstance(base, nn.Linear) or is_conv1d(base)) and base is not head and module is not head
            hit = hit and name not in never_called
        else:
            hit = matches_target(config.target_modules, name)
        # a module inside a full trainable copy (modules_to_save) gets no adapter of its own, as in PEFT
        excluded = matches_target(config.exclude_modules, name, "exclude_modules") or within_target(
            config.modules_to_save, name
        )
        if hit and not excluded and name in never_called:
            raise ValueError(
                f"{name} is the out_proj of an nn.MultiheadAttention, which uses its weight without calling it: "
                "an adapter there would have no effect"
            )
        if hit and not excluded:
            found.append(name)
    names = [name for name, _ in candidate_modules(model)]
    if not found:
        shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (", …" if len(names) > MAX_NAMES_SHOWN else "")
        raise ValueError(f"target_modules={config.target_modules!r} matches no module; the model has: {shown}")
    if isinstance(config.target_modules, list):  # a mistyped name would leave its layers untrained without a word
        for target in config.target_modules:
            if not any(matches_target([target], name) for name in names):
                warnings.warn(f"target_modules name {target!r} matches no module of the model", stacklevel=3)
    return found


def check_known(model: nn.Module, names: list[str]) -> None:
    known = list(configs(model))
    for name in names:
        if name not in known:
            raise ValueError(f"unknown adapter {name!r}; the model has: {', '.join(known) or 'no adapters'}")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# -- adding and removing adapters ------------------------------------------------------------------


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Adds adapter `adapter` to the layers `config` targets, in place, and makes it the active one.

    Only the new adapter trains afterwards (plus `modules_to_save` copies and the biases `config.bias`
    names); every other parameter, other adapters' included, is frozen.

    Args:
        model: any PyTorch model; one that has adapters already gets one more.
        config: which modules get the adapter (`target_modules`, `exclude_modules`, `modules_to_save`) and its
            rank, scale, dropout and init.
        adapter: the new adapter's name: letters, digits, "_" and "-", neither "__base__" (BASE) nor a name the
            model has already.

    Returns:
        The model, changed in place.

    Raises:
        ValueError: a bad or taken adapter name; `target_modules` that match no module, or that pick an
            nn.MultiheadAttention's out_proj; a target lorakit cannot wrap (it wraps nn.Linear, transformers
            Conv1D, nn.Embedding and nn.Conv1d/2d/3d without groups); `modules_to_save` that match no module, or
            a module that carries adapters; an SVD init on a layer it cannot start from (not Linear or Conv1D,
            r above min(out, in), alpha 0) or on a tied weight; adapters merged into the base weights.
        RuntimeError: called inside `lk.disabled(model)`.

    Warns:
        UserWarning: a name of a `target_modules` list that matches no module (while others do), one warning
            per name.
    """
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter) or adapter == BASE:
        raise ValueError(f"adapter names are letters, digits, '_' and '-' (not {BASE!r}), got {adapter!r}")
    if adapter in configs(model):
        raise ValueError(f"the model already has an adapter named {adapter!r}; delete it first or pick another name")
    check_not_disabled(model, "add an adapter")
    check_merged_stay_active(model, [adapter])  # the new adapter becomes the only active one
    targets = find_targets(model, config) if config.target_modules or not config.target_parameters else []
    # wrap everything first, so that an unsupported module fails before the model is touched
    layers, keys = {}, {}  # path -> layer, and the name its rank_pattern and alpha_pattern match
    for path in targets:
        module = model.get_submodule(path)
        layers[path], keys[path] = module if isinstance(module, LoraLayer) else wrap_module(module), path
    if config.target_parameters:
        for path, layer, key in parameter_targets(model, config, targets):
            layers[path], keys[path] = layer, key
    token_paths = {}
    if config.trainable_token_indices is not None:
        token_paths = token_targets(model, config.trainable_token_indices, list(candidate_modules(model)))
    for path in token_paths:
        if path in layers:
            raise ValueError(f"{path} cannot take both a LoRA adapter and trainable_token_indices")
    copy_paths = [
        name for name, _ in candidate_modules(model) if matches_target(config.modules_to_save, name, "modules_to_save")
    ]
    if config.modules_to_save and not copy_paths:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matches no module")
    for path in copy_paths:
        if any(isinstance(m, LoraLayer) for m in model.get_submodule(path).modules()):
            raise ValueError(f"{path} carries LoRA adapters and cannot also be a full trainable copy (modules_to_save)")
    ranks = {path: config.rank_for(keys[path]) for path in layers}
    check_memory(factor_bytes(layers, ranks), f"adapter {adapter!r} (r={config.r})")  # before any is allocated

    from_weight = is_svd_init(config.init)
    if from_weight:  # every layer checked before the first weight is rewritten
        why = f"init={config.init!r} rewrites the weight and would change both; use another init or untie them"
        refuse_tied(model, list(layers), why)
        for path, layer in layers.items():
            check_svd_init(layer, path, config.init, config.rank_for(path), config.scale_for(path))
    # an SVD init rewrites base weights: keep them, so that a failure half-way leaves the model as it was
    saved = {path: layer.base.weight.detach().clone() for path, layer in layers.items()} if from_weight else {}
    done = []
    try:
        for path, layer in layers.items():
            layer.add_adapter(
                adapter,
                config.rank_for(keys[path]),
                config.scale_for(keys[path]),
                config.dropout,
                config.init,
                config.init_std,
                lora_bias=config.lora_bias,
            )
            done.append(path)
            if from_weight:
                initialise_from_weight(layer, adapter, config.init)
            if config.use_dora:  # m = ‖W + s·B·A‖ of the factors as they start
                dora.add_magnitude(layer, adapter)
    except BaseException:
        for path in done:
            layer = layers[path]
            layer.remove_adapter(adapter)
            if path in saved:
                with torch.no_grad():
                    layer.base.weight.copy_(saved[path])
        raise
    for path, layer in layers.items():
        _set_module(model, path, layer)
    for path in copy_paths:
        module = model.get_submodule(path)
        copies = module if isinstance(module, ModuleCopies) else ModuleCopies(module)
        copies.add_copy(adapter)
        _set_module(model, path, copies)
    for path, ids in token_paths.items():
        add_trainable_tokens(model, path, ids, adapter, config.init)
    write_state(model).configs[adapter] = config
    set_adapter(model, adapter)
    mark_trainable(model, adapter)
    return model


def parameter_targets(model: nn.Module, config: LoraConfig, module_targets: list[str]) -> list:
    """(path, layer, parameter key) of the parameters `config.target_parameters` picks (lorakit.engine.parameters)."""
    found = parameter_layers(candidate_modules(model), config.target_parameters)
    if not found:
        raise ValueError(f"target_parameters={config.target_parameters!r} matches no parameter of the model")
    owners = {key.rpartition(".")[0] for _, _, key in found}
    for owner in owners:
        if owner in module_targets:
            raise ValueError(f"{owner} is picked by both target_modules and target_parameters")
        inner = next((other for other in owners if other.startswith(f"{owner}.")), None)
        if inner is not None:  # PEFT fails on these too
            raise ValueError(f"target_parameters pick parameters of {owner} and of {inner} inside it: pick one of them")
    return found


def add_trainable_tokens(model: nn.Module, path: str, ids: list[int], adapter: str, init: str | bool) -> None:
    """Rows `ids` of module `path` train with `adapter` (lorakit.engine.tokens); an output layer tied to its
    weight reads the same rows, as in PEFT."""
    module = model.get_submodule(path)
    tokens = module if isinstance(module, TrainableTokens) else TrainableTokens(module)
    tokens.add_adapter(adapter, ids, init)
    _set_module(model, path, tokens)
    for other_path, other in list(candidate_modules(model)):
        if isinstance(other, nn.Linear) and other.weight is tokens.base.weight:
            _set_module(model, other_path, TrainableTokens(other, source=tokens))


def factor_bytes(layers: dict[str, LoraLayer], ranks: dict[str, int]) -> int:
    """The bytes of the factors of rank `ranks[path]` on `layers` ({path: layer}), in the dtype each is made in."""
    total = 0
    for path, layer in layers.items():
        weight = layer.weight
        size = weight.element_size() if weight.is_floating_point() else 4  # float32 beside a quantized weight
        total += size * sum(math.prod(shape) for shape in layer.factor_shapes(ranks[path]))
    return total


def mark_trainable(model: nn.Module, adapter: str) -> None:
    """Freezes everything, then unfreezes `adapter`'s factors, copies and the biases its config trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter).values():
        p.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Removes one adapter everywhere; layers left with no adapter become their original modules again.

    A merged adapter is taken out of the base weights first, and one initialised from the weight (PiSSA, MiLoRA,
    OLoRA) puts the original weight back. Removing the last adapter leaves a plain model.

    Args:
        model: a model with adapters.
        adapter: the name of the adapter to remove.

    Raises:
        ValueError: the model has no adapter named `adapter`.
    """
    check_known(model, [adapter])
    for path, layer in reversed(list(lora_layers(model))):  # the innermost first: their paths pass through others
        if adapter in layer.lora_A:
            layer.remove_adapter(adapter)
            if not layer.lora_A:
                _set_module(model, path, layer.base)
    for path, tokens in list(token_layers(model)):
        tokens.remove_adapter(adapter)
        if not tokens.table().rows:
            _set_module(model, path, tokens.base)
    for path, copies in list(module_copies(model)):
        if adapter in copies.copies:
            del copies.copies[adapter]
            copies.active_adapters = [n for n in copies.active_adapters if n != adapter]
            if not copies.copies:
                _set_module(model, path, copies.original)
    state = write_state(model)
    del state.configs[adapter]
    state.active = [name for name in state.active if name != adapter]
    if not state.configs and not state.disabled_depth:
        drop_state(model)  # no adapter left: a plain model again


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added.

    Args:
        model: any PyTorch model.

    Returns:
        The adapter names, a new list (empty for a plain model).
    """
    return list(configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    return list(read_state(model).active)


def check_merged_stay_active(model: nn.Module, names: list[str]) -> None:
    """A merged adapter is part of the base weights: it cannot be switched off by making others active."""
    layers = [*lora_layers(model), *token_layers(model)]
    merged = {name for _, layer in layers for name in layer.merged_adapters}
    if merged - set(names):
        raise ValueError(
            f"adapters {sorted(merged - set(names))} are merged into the base weights: "
            "lk.unmerge(model) before changing the active adapters"
        )


def set_adapter(model: nn.Module, adapters: str | list[str]) -> None:
    """Makes `adapters` the active ones; several active adapters add their updates up.

    Which parameters train does not change (`inject` and `load_adapter(..., trainable=True)` decide that).

    Args:
        model: a model with adapters.
        adapters: one adapter name, or a list of them; every adapter not named becomes inactive (an empty
            list: the base model alone). A modules_to_save module runs the copy of the first named adapter that
            has one.

    Raises:
        ValueError: a name the model has no adapter for, or a merged adapter left out of `adapters`
            (`unmerge` first).
    """
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    check_known(model, names)
    check_merged_stay_active(model, names)
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_A]
    for _, copies in module_copies(model):
        copies.active_adapters = [n for n in names if n in copies.copies]
    for _, tokens in token_layers(model):
        tokens.active_adapters = [n for n in names if tokens.has(n)]
    write_state(model).active = names


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base alone; the previous state returns even if the block raises.

    The base as it is now: under an adapter initialised from the weight (PiSSA, MiLoRA, OLoRA) that is the
    residual W − s·B₀A₀, not the original W, which `unload` gives back. Within the block, `inject` and `merge`
    raise RuntimeError.

    Args:
        model: any PyTorch model (a plain one is simply itself).

    Yields:
        The model itself, with every adapter and `modules_to_save` copy switched off.

    Raises:
        RuntimeError: adapters are merged into the base weights (`unmerge` first).
    """
    switches = [m for _, m in [*lora_layers(model), *module_copies(model), *token_layers(model)]]
    if any(not isinstance(m, ModuleCopies) and m.merged_adapters for m in switches):
        raise RuntimeError("adapters are merged into the base weights: lk.unmerge(model) before disabling them")
    previous = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    state = write_state(model)
    state.disabled_depth += 1  # inject and merge refuse to run inside (check_not_disabled)
    try:
        yield model
    finally:
        for m, was in zip(switches, previous, strict=True):
            m.disabled = was
        state.disabled_depth -= 1
        if not state.configs and not state.disabled_depth:
            drop_state(model)


def check_not_disabled(model: nn.Module, action: str) -> None:
    """Refuses `action` inside `disabled(model)`: a new layer would run there, a merge would change the base."""
    if read_state(model).disabled_depth:
        raise RuntimeError(f"cannot {action} inside lk.disabled(model): do it before or after the block")


# -- merging ----------------------------------------------------------------------------------------


def merge(model: nn.Module, safe: bool = False) -> None:
    """Folds the active adapters into the base weights: W ← W + s·BA. Undo with `unmerge`.

    safe=True computes every merged weight first and raises, leaving all weights untouched, if any
    would hold NaN or inf.

    Args:
        model: a model with adapters; adapters merged already are left as they are.
        safe: check every merged weight for NaN and inf before any weight changes.

    Raises:
        ValueError: a weight to merge into is tied to another parameter (a tied embedding and output head); an
            adapter's tensors on the meta device or on another device than the weight, or factors that are not
            of one floating-point dtype (`check_foldable`); with safe=True, a merged weight would hold NaN or inf.
        RuntimeError: called inside `lk.disabled(model)`.
    """
    check_not_disabled(model, "merge")
    layers = [(path, layer) for path, layer in lora_layers(model)]
    to_merge = [path for path, layer in layers if set(layer.active_adapters) - set(layer.merged_adapters)]
    refuse_tied(model, to_merge, "merging would change both; keep the adapter unmerged, or untie the weights first")
    for path, layer in layers:
        refusal = layer.merge_refusal([n for n in layer.active_adapters if n not in layer.merged_adapters])
        if refusal and path in to_merge:
            raise ValueError(f"cannot merge into {path}: {refusal}")
        check_foldable(path, model.get_submodule(path))
    if safe:
        for path, layer in layers:
            pending = [n for n in layer.active_adapters if n not in layer.merged_adapters]
            merged = layer.merged_weight(pending)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging {pending} into {path} gives NaN or inf; no weight was changed")
    tokens = [layer for _, layer in token_layers(model)]
    for layer in tokens:
        layer.check_disjoint(layer.active_adapters)
    with torch.no_grad():
        for _, layer in layers:
            layer.merge(layer.active_adapters)
    for layer in tokens:
        layer.merge(layer.active_adapters)


def check_foldable(path: str, layer: LoraLayer) -> None:
    """Refuses to fold into layer `path` what its forward pass refuses to run: an active adapter's tensors on the
    meta device beside a real weight (they hold no values: folding them would add uninitialised memory to W), on
    another device than the weight, or whose factors are not two tensors of one floating-point dtype."""
    weight = layer.weight
    for name in [n for n in layer.active_adapters if n not in layer.merged_adapters]:
        tensors = [layer.lora_A[name], layer.lora_B[name]]
        tensors += [layer.lora_magnitude[name]] if name in layer.lora_magnitude else []
        for tensor in tensors:
            if tensor.is_meta and not weight.is_meta:
                raise ValueError(f"cannot merge adapter {name!r} into {path}: {fused.FACTORS_ON_META}")
            if tensor.device != weight.device:
                raise ValueError(
                    f"cannot merge adapter {name!r} into {path}: its tensors are on {tensor.device}, the weight on "
                    f"{weight.device}"
                )
        A, B = tensors[:2]
        if A.dtype != B.dtype or A.dtype not in FLOAT_TYPES:
            raise ValueError(
                f"cannot merge adapter {name!r} into {path}: its factors are {A.dtype} and {B.dtype}, where the "
                "forward pass takes two factors of one of float16, bfloat16, float32 and float64"
            )


def unmerge(model: nn.Module) -> None:
    """Takes every merged adapter back out of the base weights.

    Args:
        model: any PyTorch model; one with nothing merged is left as it is.
    """
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.unmerge()
    for _, tokens in token_layers(model):
        tokens.unmerge()


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Plain torch modules with the active adapters folded in: no lorakit class is left in the model.

    Inactive adapters are dropped; one initialised from the weight (PiSSA, MiLoRA, OLoRA) gives its share of W
    back to the base weight first. Each `modules_to_save` module becomes the copy of the first active adapter
    that has one (the original where none has).

    Args:
        model: a model with adapters.
        dequantize: turn every quantized linear (bitsandbytes 4- or 8-bit) into an nn.Linear holding its
            dequantized weight plus the active adapters, added in float32 and rounded once to the model's dtype
            (lorakit.engine.quantized). Without it, adapters are merged into the quantized weights, rounded to
            their bits.

    Returns:
        The model, changed in place, with lorakit's bookkeeping removed.

    Raises:
        ValueError: a weight to merge into is tied to another parameter.
        RuntimeError: called inside `lk.disabled(model)`.
    """
    if dequantize:
        check_not_disabled(model, "merge")
        dequantize_linears(model)
    merge(model)
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            if name not in layer.merged_adapters:  # an adapter left out: its SVD init's share of W goes back
                layer.restore_original_weight(name)
    return _strip(model, keep_copies=True)


def unload(model: nn.Module) -> nn.Module:
    """Drops every adapter (unmerging first) and puts the original modules and weights back.

    Base weights that an adapter initialised from the weight (PiSSA, MiLoRA, OLoRA) had made the residual are
    restored, and each `modules_to_save` module becomes its original again.

    Args:
        model: any PyTorch model.

    Returns:
        The model, changed in place, with lorakit's bookkeeping removed.
    """
    unmerge(model)
    for _, layer in lora_layers(model):
        for name in list(layer.lora_A):
            layer.restore_original_weight(name)
    return _strip(model, keep_copies=False)


def _strip(model: nn.Module, keep_copies: bool) -> nn.Module:
    for path, layer in reversed([*lora_layers(model), *token_layers(model)]):  # the innermost first
        _set_module(model, path, layer.base)
    for path, copies in list(module_copies(model)):
        _set_module(model, path, copies.current() if keep_copies else copies.original)
    drop_state(model)
    return model


# -- counting and exporting -------------------------------------------------------------------------


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once.

    Args:
        model: any PyTorch model.

    Returns:
        (trainable, total): the elements of the parameters that require gradients, and of all parameters (a 4-bit
        weight counts the values it holds, two to a stored byte).
    """
    params = list(model.parameters())
    return sum(parameter_numel(p) for p in params if p.requires_grad), sum(parameter_numel(p) for p in params)


def lora_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter, detached, under PEFT's file keys: exactly what `save_adapter` writes.

    (With convert_to_lora=True, `save_adapter` writes other factors for an adapter initialised from the weight.)

    Args:
        model: a model with adapters.
        adapter: the adapter's name.

    Returns:
        {PEFT key: tensor}: the factors, the `modules_to_save` copies' parameters and the biases the adapter
        trains (see `adapter_parameters`), sharing storage with the model's parameters.

    Raises:
        ValueError: the model has no adapter named `adapter`.
    """
    return {key: p.detach() for key, p in adapter_parameters(model, adapter).items()}


def adapter_parameters(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """The live parameters that make up one adapter, under PEFT's file keys:

    - `base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (Embedding: `.lora_embedding_A` /
      `.lora_embedding_B`, no `.weight`), and where the adapter has them `.lora_B.bias` (lora_bias) and
      `.lora_magnitude_vector` (DoRA); a layer inside another (`peft_path`) under PEFT's `base_layer`;
    - trained token rows under `<path>.token_adapter.trainable_tokens_delta`;
    - each `modules_to_save` copy's parameters under the module's own path, `base_model.model.<path>.<param>`;
    - the biases the config trains (bias "all" or "lora_only"): an adapted layer's as `<path>.base_layer.bias`,
      any other under its plain path.
    """
    check_known(model, [adapter])
    params = {}
    for path, layer in lora_layers(model):
        path = peft_path(model, path)
        if adapter in layer.lora_A:
            a_key, b_key = factor_keys(path, "embedding" if isinstance(layer, LoraEmbedding) else "linear")
            params[a_key], params[b_key] = layer.lora_A[adapter], layer.lora_B[adapter]
        if adapter in layer.lora_bias:
            params[lora_bias_key(path)] = layer.lora_bias[adapter]
        if adapter in layer.lora_magnitude:
            params[magnitude_key(path)] = layer.lora_magnitude[adapter]
    for path, copies in module_copies(model):
        if adapter in copies.copies:
            for name, p in copies.copies[adapter].named_parameters():
                params[module_key(path, name)] = p
    for path, tokens in token_layers(model):
        if adapter in tokens.rows:
            params[token_rows_key(path)] = tokens.rows[adapter]
    params.update(trained_biases(model, adapter))
    return params


def trained_biases(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The base biases that train with `adapter` (its config's `bias`), under PEFT's file keys."""
    bias = configs(model)[adapter].bias
    if bias == "none":
        return {}
    wrapped = {
        f"{path}.base.bias": (peft_path(model, path), adapter in layer.lora_A) for path, layer in lora_layers(model)
    }
    copies = tuple(f"{path}." for path, _ in module_copies(model))
    found = {}
    for name, p in model.named_parameters():
        if name in wrapped:
            path, ours = wrapped[name]
            if ours:
                found[bias_key(path, wrapped=True)] = p
            elif bias == "all":  # a layer only other adapters wrap: named as in a model with just this adapter
                found[bias_key(path, wrapped=False)] = p
        elif (
            bias == "all" and name.rsplit(".", 1)[-1] == "bias" and ".lora_" not in name and not name.startswith(copies)
        ):
            found[module_key(name)] = p
    if bias == "all":  # a module only other adapters copy (modules_to_save): its original runs for this adapter
        for path, module in module_copies(model):
            if adapter not in module.copies:
                for name, p in module.original.named_parameters():
                    if name.rsplit(".", 1)[-1] == "bias":
                        found[module_key(path, name)] = p
    return found


# -- mixed batches ---------------------------------------------------------------------------------


@contextmanager
def per_sample(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Within the block, sample i of every batch the model runs uses adapter `adapter_names[i]` (`"__base__"`:
    none); the routing is removed on exit, even if the block raises.

    For code that calls the model many times on batches of the same samples, as `model.generate` does: every
    call inside the block is a mixed batch (see `forward_per_sample`, which is this around one call).

    Args:
        model: a model with adapters, none of them merged.
        adapter_names: one name per sample, in batch order: any of the model's adapters, active or not, or
            "__base__" (BASE) for the base model alone. The active adapters stay as they are; inside
            `lk.disabled(model)` every sample gets the base model.

    Yields:
        The model itself, routing each sample through its own adapter.

    Raises:
        ValueError: a name the model has no adapter for; inside the block, an adapted layer whose input batch
            is not len(adapter_names) long.
        RuntimeError: adapters are merged into the base weights (`unmerge` first).
    """
    names = [BASE, *dict.fromkeys(n for n in adapter_names if n != BASE)]
    check_known(model, names[1:])
    for option, why in (("use_dora", "DoRA adapters"), ("trainable_token_indices", "trainable token rows")):
        refused = [name for name in names[1:] if getattr(configs(model)[name], option)]
        if refused:  # as in PEFT
            raise ValueError(f"mixed batches do not take {why} ({', '.join(refused)}): run them in batches apart")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise RuntimeError("adapters are merged into the base weights: lk.unmerge(model) before a mixed batch")
    reference = next((p for p in model.parameters()), None)
    device = reference.device if reference is not None else None
    routing = PerSampleRouting(names, torch.tensor([names.index(n) for n in adapter_names], device=device))
    routed = layers + [c for _, c in module_copies(model)]
    previous = [m.routing for m in routed]  # a block inside another one gives the outer routing back
    for m in routed:
        m.routing = routing
    try:
        yield model
    finally:
        for m, was in zip(routed, previous, strict=True):
            m.routing = was


def forward_per_sample(model: nn.Module, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
    """Runs the model with adapter `adapter_names[i]` for sample i of the batch (`"__base__"`: none).

    Linear and embedding layers gather their factors per sample and apply them in one batched matmul pair;
    conv layers and `modules_to_save` copies run each adapter the batch names and keep its samples' rows.
    `per_sample` does the same for every call within a block (generation).

    Args:
        model: a model with adapters, none of them merged.
        adapter_names: one name per sample, in batch order: any of the model's adapters, active or not, or
            "__base__" (BASE) for the base model alone. The active adapters stay as they are; inside
            `lk.disabled(model)` every sample gets the base model.
        *args: the model's own positional arguments; every adapted layer's input must have len(adapter_names)
            rows in its first dimension.
        **kwargs: the model's own keyword arguments.

    Returns:
        Whatever `model(*args, **kwargs)` returns.

    Raises:
        ValueError: a name the model has no adapter for; an adapted layer whose input batch is not
            len(adapter_names) long; a `modules_to_save` module that returns something other than a tensor.
        RuntimeError: adapters are merged into the base weights (`unmerge` first).
    """
    with per_sample(model, adapter_names):
        return model(*args, **kwargs)
