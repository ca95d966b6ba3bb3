"""lorakit's bookkeeping on a model (lorakit.engine.state): one ModelState under model.__dict__, never on a plain
model from a query, never in state_dict(), copied and restored whole, and gone with the last adapter."""

import torch
from torch import nn

import lorakit as lk
from lorakit.engine.model import active_adapters
from lorakit.engine.state import KEY, ModelState, drop_state, read_state, restore_state, snapshot_state, write_state


def test_queries_on_a_plain_model_store_nothing_on_it():
    model = nn.Sequential(nn.Linear(3, 3))
    assert read_state(model) == ModelState()
    assert lk.adapter_names(model) == [] and active_adapters(model) == []
    assert KEY not in model.__dict__


def test_write_state_makes_the_entry_once_and_drop_state_removes_it():
    model = nn.Linear(2, 2)
    state = write_state(model)
    state.active.append("a")
    assert write_state(model) is state and read_state(model) is state
    drop_state(model)
    assert KEY not in model.__dict__
    drop_state(model)  # a plain model: nothing to do


def test_a_snapshot_is_a_copy_that_restore_state_puts_back_exactly():
    model = nn.Linear(2, 2)
    assert snapshot_state(model) is None
    config = lk.LoraConfig(r=1, target_modules=["x"])
    state = write_state(model)
    state.configs["a"], state.active = config, ["a"]
    saved = snapshot_state(model)
    state.configs["b"] = config
    state.active.append("b")
    state.disabled_depth = 1
    assert saved == ModelState({"a": config}, ["a"], 0)  # later changes did not reach the copy
    restore_state(model, saved)
    assert read_state(model) == ModelState({"a": config}, ["a"], 0)
    restore_state(model, None)  # the snapshot of a plain model: a plain model again
    assert KEY not in model.__dict__


def test_the_state_stays_out_of_state_dict_and_goes_with_the_last_adapter():
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(r=2, target_modules=["0"]), "a")
    assert list(read_state(model).configs) == ["a"] and read_state(model).active == ["a"]
    assert not any(KEY in key for key in model.state_dict())
    lk.delete_adapter(model, "a")
    assert KEY not in model.__dict__


def test_disabled_counts_its_depth_and_leaves_a_plain_model_plain():
    model = nn.Sequential(nn.Linear(4, 4))
    with lk.disabled(model):
        with lk.disabled(model):
            assert read_state(model).disabled_depth == 2
        assert read_state(model).disabled_depth == 1
    assert KEY not in model.__dict__
