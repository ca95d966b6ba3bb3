"""Training checkpoints (lorakit.training.checkpoint): a round trip restores everything, a damaged checkpoint is one
ValueError naming its file and leaves the run as it was, and CUDA RNG states come back in device order."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.engine.peft_format import WEIGHTS_NAME
from lorakit.training.checkpoint import STATE_NAME, TENSORS_NAME, load_checkpoint, save_checkpoint


def run_state(seed: int):
    """A small adapted model, its AdamW after one step, and a scheduler: what a checkpoint holds."""
    torch.manual_seed(seed)
    model = lk.inject(nn.Sequential(nn.Linear(6, 4)), lk.LoraConfig(r=2, target_modules=["0"], init=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def snapshot(model, optimizer, scheduler) -> dict:
    """Everything a checkpoint load could change, as tensors keyed by name and JSON (tuples become lists)."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"weight.{k}": v for k, v in lk.lora_state_dict(model).items()}
    tensors.update({f"optimizer.{i}.{k}": v for i, s in optimizer_state["state"].items() for k, v in s.items()})
    tensors["rng"] = torch.get_rng_state()
    plain = json.dumps([optimizer_state["param_groups"], scheduler.state_dict()], sort_keys=True)
    return {"tensors": {k: v.clone() for k, v in tensors.items()}, "json": plain}


def same(a: dict, b: dict) -> bool:
    return (
        a["json"] == b["json"]
        and a["tensors"].keys() == b["tensors"].keys()
        and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    )


def test_a_loaded_checkpoint_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    saved_run = run_state(seed=1)
    saved = save_checkpoint(tmp_path, 3, *saved_run, {"total_steps": 9}, keep=1)
    expected = snapshot(*saved_run)
    run = run_state(seed=2)
    torch.manual_seed(123)  # move the RNG away from the saved state
    state = load_checkpoint(saved, *run)
    assert state["step"] == 3 and state["total_steps"] == 9
    assert same(snapshot(*run), expected)


def rewrite_json(path, change):
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def rewrite_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


DAMAGE = {
    "truncated optimizer tensors": (
        lambda c: (c / TENSORS_NAME).write_bytes((c / TENSORS_NAME).read_bytes()[:100]),
        rf"{TENSORS_NAME} is not a readable safetensors file",
    ),
    "truncated adapter weights": (
        lambda c: (c / WEIGHTS_NAME).write_bytes((c / WEIGHTS_NAME).read_bytes()[:50]),
        rf"{WEIGHTS_NAME} is not a readable safetensors file",
    ),
    "state not JSON": (lambda c: (c / STATE_NAME).write_text("{"), rf"{STATE_NAME} is not valid JSON"),
    "no scheduler state": (
        lambda c: rewrite_json(c / STATE_NAME, lambda s: s.pop("scheduler")),
        rf"{STATE_NAME} is not a usable checkpoint state: no 'scheduler'",
    ),
    "scheduler state without its lambdas": (
        lambda c: rewrite_json(c / STATE_NAME, lambda s: s["scheduler"].pop("lr_lambdas")),
        rf"{STATE_NAME} is not a usable checkpoint state: no 'lr_lambdas'",
    ),
    "text for a number": (
        lambda c: rewrite_json(c / STATE_NAME, lambda s: s["param_groups"][0].update(eps="x")),
        r"param_groups\[0\]\.eps is 'x', not a number",
    ),
    "one beta": (
        lambda c: rewrite_json(c / STATE_NAME, lambda s: s["param_groups"][0].update(betas=[0.9])),
        r"param_groups\[0\]\.betas is \[0\.9\], where this run has 2 values",
    ),
    "other optimizer groups": (
        lambda c: rewrite_json(c / STATE_NAME, lambda s: s["param_groups"].append(s["param_groups"][0])),
        rf"{STATE_NAME} is not a usable checkpoint state: parameter groups of sizes",
    ),
    "misshapen optimizer state": (
        lambda c: rewrite_tensors(c / TENSORS_NAME, lambda t: t.update({"optimizer.0.exp_avg": torch.zeros(5)})),
        r"optimizer.0.exp_avg \(shape \(5,\)\) fits no parameter",
    ),
    "no CPU RNG state": (
        lambda c: rewrite_tensors(c / TENSORS_NAME, lambda t: t.pop("rng.torch")),
        rf"{TENSORS_NAME} holds no usable RNG states: no 'rng.torch'",
    ),
}


@pytest.mark.parametrize("damage, message", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_one_value_error_naming_the_file_and_changes_nothing(tmp_path, damage, message):
    saved = save_checkpoint(tmp_path, 3, *run_state(seed=1), {}, keep=1)
    damage(saved)
    run = run_state(seed=2)
    before = snapshot(*run)
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(saved, *run)
    assert str(saved) in str(error.value)
    assert same(snapshot(*run), before)


def test_cuda_rng_states_are_restored_in_device_order_past_ten_devices(tmp_path, monkeypatch):
    devices = 12
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(devices)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    saved = save_checkpoint(tmp_path, 1, *run_state(seed=1), {}, keep=1)
    load_checkpoint(saved, *run_state(seed=1))
    assert [int(state[0]) for state in restored] == list(range(devices))  # device 10 after 9, not after 1


def test_each_torchrun_process_takes_its_own_cpu_and_cuda_generator_states(tmp_path, monkeypatch):
    cpu = [torch.Generator().manual_seed(rank).get_state() for rank in range(2)]
    cuda = [torch.full((16,), 10 + rank, dtype=torch.uint8) for rank in range(2)]
    restored, restored_all = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8) for _ in range(2)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored_all.extend)
    saved = save_checkpoint(tmp_path, 1, *run_state(seed=1), {}, keep=1, rank_rng_states=cpu, rank_cuda_rng_states=cuda)
    for rank in (1, 0):
        load_checkpoint(saved, *run_state(seed=1), rank=rank)
        assert torch.equal(torch.get_rng_state(), cpu[rank])
        assert int(restored.pop()[0]) == 10 + rank  # its own device's generator, not rank 0's view of it
    assert not restored_all


def test_saving_removes_what_a_killed_save_left_behind_and_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    torn = root / ".step-000002.0123456789ab.tmp"  # the temporary directory of a save that a kill interrupted
    torn.mkdir(parents=True)
    (torn / WEIGHTS_NAME).write_bytes(b"half a checkpoint")
    (root / ".notes").write_text("not lorakit's")
    save_checkpoint(tmp_path, 3, *run_state(seed=1), {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [".notes", "step-000003"]


def test_checkpoint_of_another_rank_is_refused_and_the_adapter_left_as_it_was(tmp_path):
    from torch import nn

    from lorakit.training.checkpoint import load_checkpoint, save_checkpoint

    def adapted(r):
        torch.manual_seed(0)
        model = lk.inject(nn.Sequential(nn.Linear(6, 4)), lk.LoraConfig(r=r, target_modules=["0"], init=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    saved = save_checkpoint(tmp_path, 3, *adapted(2), {}, keep=1)
    model, optimizer, scheduler = adapted(3)
    before = {k: v.clone() for k, v in lk.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"does not fit this run \(other --r.*shape mismatch"):
        load_checkpoint(saved, model, optimizer, scheduler)
    assert all(torch.equal(before[k], v) for k, v in lk.lora_state_dict(model).items())
