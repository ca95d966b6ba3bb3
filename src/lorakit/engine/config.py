"""LoraConfig: which layers get an adapter, of what rank and scale, initialised how.

Module names are the dotted paths of `model.named_modules()`. Three ways to pick target layers:
- a list of names: a module matches when its path equals a name or ends with "." + name
  (["q_proj", "v_proj"] hits every attention's q_proj and v_proj);
- a string: a regular expression that must match the whole path (re.fullmatch);
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

    Raises:
        ValueError: no `target_modules`; r or a `rank_pattern` value that is not a positive integer; alpha or an
            `alpha_pattern` value that is not a finite number; patterns that are not a dict; an invalid regular
            expression; dropout outside [0, 1); an unknown init or bias; an init_std that is not a positive
            number.
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
        if self.target_modules is None:
            raise ValueError("LoraConfig needs target_modules: module names, a regex string or 'all-linear'")
        check_positive_int("r", self.r)
        _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            _check_regex(pattern)
        if isinstance(self.target_modules, str):
            _check_regex(self.target_modules)
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
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

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
    """Refuses a value that is not a positive integer (a bool is not one), naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None


def matches_target(spec: list[str] | str | None, module_name: str) -> bool:
    """Whether `module_name` is picked by a name list (exact or "."-suffix) or a regex (full match)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name == name or module_name.endswith("." + name) for name in spec)


def within_target(spec: list[str] | str | None, module_name: str) -> bool:
    """Whether `module_name` or a module containing it is picked by `spec` (see `matches_target`)."""
    parts = module_name.split(".")
    return any(matches_target(spec, ".".join(parts[:end])) for end in range(1, len(parts) + 1))


def targets_from_text(text: str | None) -> list[str] | str | None:
    """A command line's --targets: names separated by commas ("q_proj" or "q_proj,v_proj") become a list of
    names; text with regex syntax ("^*+?{}[]()|\\$") stays one regex matched against the whole path, and
    "all-linear" stays itself."""
    if text is None or text == ALL_LINEAR:
        return text
    if any(char in REGEX_SYNTAX for char in text):
        _check_regex(text)
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of `module_name` at a "." boundary."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name):
            return value
    return default
