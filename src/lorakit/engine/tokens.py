"""PEFT's `trainable_token_indices`: chosen rows of an embedding trained in full and the others left alone (the
embeddings of new tokens, say), beside the adapter.

`LoraConfig(trainable_token_indices=[32000, 32001])` picks rows of the model's input embedding; {module name:
ids} picks them in the modules named (matched as a list of target_modules is). TrainableTokens wraps such a
module and holds, per adapter, the chosen rows' values (n × dim), starting as they are, and their originals for
unmerging. A forward pass runs the module and takes the adapter's rows wherever a token is one of the chosen.
The file holds them as PEFT writes them, `<path>.token_adapter.trainable_tokens_delta`: the rows' values (not
differences, whatever the name says).

An output layer that shares the embedding's weight (tied, as GPT-2's head) gets the same rows, as in PEFT: it
computes those tokens' logits from the trained rows, and the file holds the rows once. Merging writes the rows
into the weight. Several adapters active at once must choose different rows (as in PEFT).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.engine.config import matches_target

__all__ = ["TrainableTokens", "token_targets"]


class TrainableTokens(nn.Module):
    """An nn.Embedding (or a Linear output layer) and, per adapter, trained values of some of its rows; a tied
    output layer reads the rows of the embedding's wrapper (`source`) instead of holding its own."""

    def __init__(self, base: nn.Module, source: TrainableTokens | None = None):
        super().__init__()
        self.base = base
        self.rows = nn.ParameterDict()  # adapter -> the chosen rows' values (n × dim)
        self.indices: dict[str, list[int]] = {}
        self._source = [source] if source is not None else []  # a list: not a submodule, not saved twice
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing = None
        self.train(base.training)

    def table(self) -> TrainableTokens:
        """The wrapper that holds the rows: this one, or for a tied output layer the embedding's."""
        return self._source[0] if self._source else self

    def add_adapter(self, name: str, indices: list[int], init: bool | str) -> None:
        """Rows `indices` of the weight trained for adapter `name`: their values now (random with init=False)."""
        weight = self.base.weight
        if self._source:
            return
        original = weight.detach()[indices].clone()
        self.rows[name] = nn.Parameter(torch.randn_like(original) if init is False else original.clone())
        self.register_buffer(f"original_{name}", original)
        self.indices[name] = list(indices)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        if name in self.rows:
            del self.rows[name]
            delattr(self, f"original_{name}")
            del self.indices[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def has(self, name: str) -> bool:
        return name in self.table().rows

    def check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in names:
            ids = set(self.table().indices[name])
            if ids & seen:
                raise ValueError(f"adapter {name!r} trains token rows another active adapter trains too")
            seen |= ids

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.routing is not None:
            raise ValueError("mixed batches do not run through trainable_token_indices")
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled or not pending:
            return y
        self.check_disjoint(pending)
        table = self.table()
        for name in pending:
            rows, ids = table.rows[name], torch.tensor(table.indices[name], device=y.device)
            if isinstance(self.base, nn.Embedding):
                slots = torch.full((self.base.num_embeddings,), -1, device=x.device)
                slots[ids] = torch.arange(len(ids), device=x.device)
                slot = slots[x]  # the row of each token among the chosen, −1 for the others
                chosen = rows[slot.clamp(min=0)]
                scale = getattr(self.base, "embed_scale", None)  # embeddings that scale their output (Gemma's)
                chosen = chosen if scale is None else chosen * scale
                y = torch.where((slot >= 0).unsqueeze(-1), chosen.to(y.dtype), y)
            else:  # a Linear output layer: the chosen tokens' logits from the trained rows
                bias = self.base.bias[ids] if self.base.bias is not None else None
                y = y.index_copy(-1, ids, F.linear(x, rows.to(x.dtype), bias).to(y.dtype))
        return y

    def merge(self, names: list[str]) -> None:
        new = [n for n in names if self.has(n) and n not in self.merged_adapters]
        self.check_disjoint([*self.merged_adapters, *new])
        table = self.table()
        with torch.no_grad():
            for name in new:
                ids = torch.tensor(table.indices[name], device=self.base.weight.device)
                self.base.weight.index_copy_(0, ids, table.rows[name].to(self.base.weight.dtype))
                self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        table = self.table()
        with torch.no_grad():
            for name in list(reversed(self.merged_adapters)):
                if names is None or name in names:
                    ids = torch.tensor(table.indices[name], device=self.base.weight.device)
                    original = getattr(table, f"original_{name}")
                    self.base.weight.index_copy_(0, ids, original.to(self.base.weight.dtype))
                    self.merged_adapters.remove(name)


def token_targets(
    model: nn.Module, indices: list[int] | dict[str, list[int]], modules: list[tuple[str, nn.Module]]
) -> dict[str, list[int]]:
    """{path: token ids} of the modules whose rows `indices` trains, among `modules` ((path, module) pairs): a
    list names the model's input embedding (or, as PEFT falls back to, the module named "embed_tokens").

    Raises:
        ValueError: a name that matches no module, a module that is not an nn.Embedding or nn.Linear, or a token
            id past its rows.
    """
    if isinstance(indices, dict):
        by_name = indices
    else:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        found = [path for path, module in modules if module is embedding]
        by_name = {found[0] if found else "embed_tokens": indices}
    targets = {}
    for name, ids in by_name.items():
        paths = [path for path, _ in modules if matches_target([name], path)]
        if not paths:
            raise ValueError(f"trainable_token_indices names {name!r}, which matches no module")
        for path in paths:
            module = dict(modules)[path]
            base = module.base if isinstance(module, TrainableTokens) else module
            if not isinstance(base, nn.Embedding | nn.Linear):
                raise ValueError(
                    f"trainable_token_indices: {path} is a {type(base).__name__}; it takes an nn.Embedding or nn.Linear"
                )
            if max(ids) >= base.weight.shape[0]:
                raise ValueError(f"trainable_token_indices: {path} has {base.weight.shape[0]} rows, no row {max(ids)}")
            targets[path] = ids
    return targets
