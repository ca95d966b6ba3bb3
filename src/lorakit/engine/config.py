"""LoraConfig: which layers get an adapter, of what rank and scale, initialised how.

Module names are the dotted paths of `model.named_modules()`. Three ways to pick target layers:
- a list of names: a module matches when its path equals a name or ends with "." + name
  (["q_proj", "v_proj"] hits every attention's q_proj and v_proj);
- a string: a regular expression that must match the whole path (a full match, in bounded time);
- "all-linear": every nn.Linear and transformers Conv1D except the model's output head.
`rank_pattern` and `alpha_pattern` override r and α per layer: each key is a regular expression (a plain
name works too) matched against the end of the path at a "." boundary, as PEFT does; the first matching key
in sorted order wins (the order in which PEFT resolves them when it loads a saved config).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lorakit.io.untrusted import check_pattern, fullmatch

__all__ = [
    "ALL_LINEAR",
    "BIAS_MODES",
    "INIT_MODES",
    "PISSA_NITER",
    "SVD_INITS",
    "LoraConfig",
    "is_svd_init",
    "matches_target",
    "pattern_value",
    "targets_from_text",
    "within_target",
]

ALL_LINEAR = "all-linear"
REGEX_SYNTAX = set("^$*+?{}[]()|\\")  # "." is left out: "self_attn.q_proj" is a name, matched as a path suffix
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", False)
SVD_INITS = ("pissa", "milora", "olora")  # inits from the weight's own SVD or QR (lorakit.engine.svd_init)
MAX_SIZE = 2**63 - 1  # the largest size torch takes (int64)
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PiSSA through the randomized SVD, K subspace iterations


def is_svd_init(init: object) -> bool:
    """Whether `init` names an init taken from the weight itself: "pissa", "pissa_niter_K", "milora", "olora"."""
    return isinstance(init, str) and (init in SVD_INITS or PISSA_NITER.fullmatch(init) is not None)


@dataclass
class LoraConfig:
    """One adapter's settings. ΔW = s · B A with s = alpha / r (alpha / √r with use_rslora).

    Module names are the dotted paths of `model.named_modules()`; how names, regexes and patterns match them is
    in this module's docstring.

    Attributes:
        r: rank of the update, a positive integer.
        alpha: its scale numerator, a finite number.
        target_modules: the layers that get the adapter: a list of names, a regex string, or "all-linear".
            Required; a tuple or set becomes a sorted list.
        exclude_modules: modules that get no adapter although `target_modules` picks them, matched the same way
            (None: none).
        dropout: on the adapter's input only, in [0, 1).
        init: "kaiming" (A kaiming-uniform with a=√5, B = 0), "gaussian" (A ~ N(0, init_std²), B = 0),
            False (both random, a non-zero adapter for tests), or one of the inits from the SVD or QR of the
            weight, "pissa", "pissa_niter_K", "milora", "olora" (lorakit.engine.svd_init), which move the start
            of training into the weight's own directions and leave W − s·B·A as the base. True reads as
            "kaiming". (Embedding layers start as PEFT's do: A = 0 and B ~ N(0, 1), both random with False.)
        init_std: the standard deviation of "gaussian"'s A, a positive number (None: 1/r).
        use_rslora: scale by alpha / √r (rank-stabilised LoRA) instead of alpha / r.
        bias: which base biases train, "none", "all" or "lora_only" (those of adapted layers).
        rank_pattern: {pattern: rank} overriding r per layer; the first matching key in sorted order wins.
        alpha_pattern: {pattern: alpha} overriding alpha per layer, likewise.
        modules_to_save: modules (matched like a target list) trained as full copies, e.g. a new classifier.
        task_type: written to the PEFT config file (e.g. "CAUSAL_LM"); "SEQ_CLS" adds the heads "classifier"
            and "score" to modules_to_save, as PEFT does.
        use_dora: DoRA (lorakit.engine.dora): a trained magnitude per output beside the low-rank direction.
        lora_bias: B gets a trainable bias (zero at the start), added as s · bias to the layer's output.
        trainable_token_indices: rows of an embedding trained as they are, beside the adapter (new tokens, say):
            a list of token ids for the model's input embedding, or {module name: ids} (lorakit.engine.tokens).
        target_parameters: parameters, not modules, that get the adapter, by "<module path>.<parameter>" (or
            its end after a "."), e.g. the stacked expert weights of a mixture-of-experts layer
            (lorakit.engine.parameters). With these, `target_modules` may be None.

    Raises:
        ValueError: no `target_modules`; r or a `rank_pattern` value that is not a positive integer; alpha or an
            `alpha_pattern` value that is not a finite number; patterns that are not a dict; an invalid regular
            expression; dropout outside [0, 1); an unknown init or bias; an init_std that is not a positive
            number; use_dora with lora_bias; target_parameters with dropout, DoRA or lora_bias; token indices that
            are not lists of non-negative integers.
    """

    r: int = 8
    alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    dropout: float = 0.0
    init: str | bool = "kaiming"
    init_std: float | None = None
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, tuple | set):
            self.modules_to_save = sorted(self.modules_to_save)
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must map module patterns to values, got {getattr(self, name)!r}")
        # PEFT writes the config with sorted keys and resolves patterns first-match on load, so lorakit
        # resolves them in sorted order too: the same layer gets the same rank in memory and after a reload
        self.rank_pattern = dict(sorted(self.rank_pattern.items()))
        self.alpha_pattern = dict(sorted(self.alpha_pattern.items()))
        if self.task_type == "SEQ_CLS":  # as PEFT: a classification head is trained in full
            self.modules_to_save = list(dict.fromkeys([*(self.modules_to_save or []), "classifier", "score"]))
        if isinstance(self.target_parameters, tuple | set):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_modules is None and not self.target_parameters:
            raise ValueError(
                "LoraConfig needs target_modules (module names, a regex string or 'all-linear') or target_parameters"
            )
        check_positive_int("r", self.r)
        _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                check_pattern(pattern, f"{name}[{pattern!r}]")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            _check_targets(name, getattr(self, name))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init is True:
            self.init = "kaiming"
        if self.init not in INIT_MODES and not is_svd_init(self.init):
            raise ValueError(
                f"init must be one of {INIT_MODES}, 'pissa', 'pissa_niter_K', 'milora' or 'olora', got {self.init!r}"
            )
        if self.init_std is not None and not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.use_dora and self.lora_bias:  # PEFT's own merge of the two disagrees with its forward pass
            raise ValueError("use_dora with lora_bias is not supported")
        if self.target_parameters and (self.dropout or self.use_dora or self.lora_bias):
            raise ValueError("target_parameters work without dropout, use_dora and lora_bias, as in PEFT")
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)

    def rank_for(self, module_name: str) -> int:
        """The rank of the module at `module_name`: its `rank_pattern` entry, else r.

        Args:
            module_name: the module's dotted path in the model.

        Returns:
            The value of the first `rank_pattern` key that matches the end of the path at a "." boundary, else r.
        """
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The α of the module at `module_name`: its `alpha_pattern` entry, else alpha.

        Args:
            module_name: the module's dotted path in the model.

        Returns:
            The value of the first `alpha_pattern` key that matches the end of the path at a "." boundary, else
            alpha.
        """
        return pattern_value(self.alpha_pattern, module_name, self.alpha, "alpha_pattern")

    def scale_for(self, module_name: str, r: int | None = None) -> float:
        """s = α / r (α / √r with rsLoRA) for a module; `r` overrides the configured rank (say, a file's).

        Args:
            module_name: the module's dotted path in the model; it picks α (`alpha_for`) and, without `r`, the
                rank (`rank_for`).
            r: the rank to scale for instead of the configured one (None: `rank_for(module_name)`). Not checked.

        Returns:
            The scale s of the module's update ΔW = s · B A.

        Raises:
            ZeroDivisionError: r=0.
        """
        r = self.rank_for(module_name) if r is None else r
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def check_positive_int(name: str, value: Any) -> None:
    """Refuses a value that is not a positive integer (a bool is not one) that torch can hold as a size, naming
    it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(f"{name} must be at most 2**63 - 1, got a number of {len(str(value))} digits")


def _check_alpha(name: str, value: Any) -> None:
    try:
        finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:  # an integer past the largest float: 10**400
        finite = False
    if not finite:
        shown = f"a number of {len(str(value))} digits" if isinstance(value, int) else repr(value)
        raise ValueError(f"{name} must be a finite number, got {shown}")


def _token_indices(indices: Any) -> list[int] | dict[str, list[int]] | None:
    """trainable_token_indices checked: None, a list of token ids, or {module name: list of token ids}."""
    if indices is None:
        return None
    by_module = indices if isinstance(indices, dict) else {"": indices}
    for name, ids in by_module.items():
        if (
            not isinstance(ids, list | tuple)
            or not ids
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
        ):
            where = f"[{name!r}]" if name else ""
            raise ValueError(f"trainable_token_indices{where} must be a list of token ids, got {ids!r}")
    return {name: list(ids) for name, ids in indices.items()} if isinstance(indices, dict) else list(indices)


def _check_targets(name: str, spec: Any) -> None:
    """Refuses a `target_modules`-like field that is neither None, a regular expression nor a list of names."""
    if isinstance(spec, str):
        check_pattern(spec, name)
    elif spec is not None and not (isinstance(spec, list) and all(isinstance(item, str) for item in spec)):
        raise ValueError(f"{name} must be a list of module names or a regular expression, got {spec!r}")


def matches_target(spec: list[str] | str | None, module_name: str, key: str = "target_modules") -> bool:
    """Whether `module_name` is picked by a name list (exact or "."-suffix) or a regex (full match, in bounded
    time: lorakit.io.untrusted.fullmatch; `key` names the config field in its error)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return fullmatch(spec, module_name, key)
    return any(module_name == name or module_name.endswith("." + name) for name in spec)


def within_target(spec: list[str] | str | None, module_name: str, key: str = "modules_to_save") -> bool:
    """Whether `module_name` or a module containing it is picked by `spec` (see `matches_target`)."""
    parts = module_name.split(".")
    return any(matches_target(spec, ".".join(parts[:end]), key) for end in range(1, len(parts) + 1))


def targets_from_text(text: str | None) -> list[str] | str | None:
    """A command line's --targets: names separated by commas ("q_proj" or "q_proj,v_proj") become a list of
    names; text with regex syntax ("^*+?{}[]()|\\$") stays one regex matched against the whole path, and
    "all-linear" stays itself."""
    if text is None or text == ALL_LINEAR:
        return text
    if any(char in REGEX_SYNTAX for char in text):
        check_pattern(text, "--targets")
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any, key: str = "rank_pattern") -> Any:
    """The value of the first pattern that matches the end of `module_name` at a "." boundary (in bounded time;
    `key` names the config field in its error)."""
    for pattern, value in patterns.items():
        if fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name, f"{key}[{pattern!r}]"):
            return value
    return default
