"""A run owns its --out (lorakit.training.ownership): checked against its inputs, held against a second run, and
cleared of the leftovers of its own killed writes, and of nothing else."""

import os

import pytest

import lorakit as lk
from lorakit.io.lock import LOCK_NAME
from lorakit.training.checkpoint import OWN_FILES
from lorakit.training.ownership import owned_out


def config(tmp_path, out, **more) -> lk.TrainConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    return lk.TrainConfig(model=str(tmp_path / "model"), data=str(tmp_path / "train.jsonl"), out=str(out), **more)


def test_a_run_removes_its_own_leftovers_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000004.0123456789ab.tmp").mkdir(parents=True)  # a checkpoint a kill interrupted
    (out / "checkpoints" / ".step-000002.0123456789ab.old").mkdir()  # a pruning a kill interrupted
    (out / ".adapter_model.safetensors.0123456789ab.tmp").write_text("half a file")
    (out / ".run.0123456789ab.tmp").mkdir()  # the final save's temporary directory
    (out / "notes.txt").write_text("the user's")
    (out / ".hidden").write_text("the user's")
    with owned_out(config(tmp_path, out)):
        assert sorted(os.listdir(out)) == [".hidden", LOCK_NAME, "checkpoints", "notes.txt"]
        assert os.listdir(out / "checkpoints") == []
    assert sorted(os.listdir(out)) == [".hidden", "checkpoints", "notes.txt"]


def test_a_second_run_is_refused_while_the_first_owns_the_out(tmp_path):
    run = config(tmp_path, tmp_path / "run")
    with owned_out(run), pytest.raises(ValueError, match=f"pid {os.getpid()}"), owned_out(run):
        pass
    with owned_out(config(tmp_path, tmp_path / "run")):  # released: the next run goes ahead
        pass


@pytest.mark.parametrize(
    "out, message",
    [("model", "is the model directory"), ("train.jsonl", "is the data"), ("", "--out must not be empty")],
)
def test_an_out_on_an_input_is_refused_before_anything_is_made(tmp_path, out, message):
    run = config(tmp_path, tmp_path / out if out else "")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message), owned_out(run):
        pass
    assert sorted(os.listdir(tmp_path)) == before


def test_under_torchrun_only_rank_0_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with owned_out(config(tmp_path, tmp_path / "run")):
        assert not (tmp_path / "run").exists()  # rank 1 writes nothing, not even the lock


def test_a_resumed_run_prunes_the_checkpoint_a_kill_left_unpruned(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2, 3):
        checkpoint = out / "checkpoints" / f"step-00000{step}"
        checkpoint.mkdir(parents=True)
        for name in (*OWN_FILES, "adapter_config.json", "adapter_model.safetensors"):
            (checkpoint / name).write_text("x")
    with owned_out(config(tmp_path, out, keep_checkpoints=2, resume=True)):
        assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000003"]
