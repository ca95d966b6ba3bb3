"""Runs of several processes (lorakit.training.distributed).

Under torchrun: DDP and FSDP2 match one process with the same global batch, resume bit for bit, evaluate an uneven
split without deadlock, and the command runs. Each starts processes and takes tens of seconds: all are slow, and
`make test`'s `--dist loadfile` gives them one xdist worker, since two torchrun jobs at once would put four
processes on two cores. Without torchrun: one process, which owns no process group."""

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch
import torch.distributed.fsdp
from helpers import SENTENCES, TORCHRUN, adapters_equal, finetune_args, run_module, write_jsonl
from safetensors.torch import load_file

import lorakit as lk
from lorakit.training.distributed import Processes, fully_shard_api, start_processes
from lorakit.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama, word_data, tmp_path, fsdp):
    common = ["--steps", "4", "--dropout", "0", "--grad-accum", "2"]
    single = tmp_path / "single"
    assert run_module(finetune_args(tiny_llama, word_data, single, *common, "--batch-size", "8")).returncode == 0
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from safetensors.torch import save_file\n"
        "import lorakit as lk\n"
        "from lorakit.training.loop import Trainer\n"
        f"config = lk.TrainConfig(model={str(tiny_llama)!r}, data={str(word_data)!r},\n"
        f"    out={str(tmp_path / 'multi')!r},\n"
        f"    steps=4, dropout=0.0, grad_accum=2, batch_size=4, fsdp={fsdp}, progress=False)\n"
        "trainer = Trainer(config)\n"
        "trainer.procs.owns_group = False  # keep the group to save every rank's copy below\n"
        "trainer.run()\n"
        "state = {k: v.contiguous() for k, v in lk.lora_state_dict(trainer.model).items()}\n"
        f"save_file(state, {str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.safetensors')\n"
        "trainer.procs.end()\n"
    )
    result = subprocess.run([*TORCHRUN, "2", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if fsdp:
        assert "FSDP2: frozen base sharded over 2 processes" in result.stdout + result.stderr
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert adapters_equal(single, tmp_path / "multi", atol=1e-5)


@pytest.mark.slow
def test_two_processes_with_dropout_resume_bit_for_bit_like_an_uninterrupted_run(tiny_llama, tmp_path):
    # texts of many lengths: the two processes pad to different shapes and draw different numbers of dropout
    # masks, so each process's own generator state must come back, not rank 0's
    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))} for _ in range(64)]
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    args = ["--steps", "4", "--save-every", "2", "--dropout", "0.2", "--batch-size", "4", "--no-progress"]

    def torchrun(out, *extra):
        argv = [*TORCHRUN, "2", "-m", "lorakit", *finetune_args(tiny_llama, data, out, *args, *extra)]
        result = subprocess.run(argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "full")
    torchrun(tmp_path / "resumed")
    run = tmp_path / "resumed"  # as a kill after step 2 leaves it: the later checkpoint and the results gone
    shutil.rmtree(run / "checkpoints" / "step-000004")
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.json"):
        (run / name).unlink()
    torchrun(run, "--resume")
    assert adapters_equal(tmp_path / "full", run)


@pytest.mark.slow
def test_fsdp_evaluation_over_an_uneven_split_finishes_with_the_metrics_of_one_process(tiny_llama, tmp_path):
    # 17 eval examples over 2 processes with batch 8: rank 0 has 9 (two forward passes), rank 1 has 8 (one);
    # every FSDP forward all-gathers, so rank 0's second pass must be matched or the processes deadlock
    rng = random.Random(0)
    rows = lambda n: [{"text": s, "label": s.split()[0]} for s in (rng.choice(SENTENCES) for _ in range(n))]  # noqa: E731
    data, eval_data = write_jsonl(tmp_path / "train.jsonl", rows(32)), write_jsonl(tmp_path / "eval.jsonl", rows(17))
    common = dict(model=str(tiny_llama), data=str(data), eval_data=str(eval_data), task="seq-cls", batch_size=8)
    single = Trainer(lk.TrainConfig(**common, out=str(tmp_path / "single"), steps=1, progress=False)).evaluate()
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, torch.distributed as dist\n"
        "import lorakit as lk\n"
        "from lorakit.training.loop import Trainer\n"
        f"config = lk.TrainConfig(**{common!r}, out={str(tmp_path / 'multi')!r}, steps=1, fsdp=True, progress=False)\n"
        "trainer = Trainer(config)\n"
        "result = trainer.evaluate()\n"
        f"open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.json', 'w').write(json.dumps(result))\n"
        "trainer.procs.end()\n"
    )
    process = subprocess.Popen(
        [*TORCHRUN, "2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes SIGTERM on to the ranks it started (each in its own session)
        process.communicate()
        pytest.fail("the processes deadlocked in evaluate()")
    assert process.returncode == 0, output[-3000:]
    assert "FSDP2: frozen base sharded over 2 processes" in output
    for rank in (0, 1):
        multi = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert multi.keys() == single.keys() == {"eval_loss", "eval_accuracy"}
        assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
        assert multi["eval_accuracy"] == single["eval_accuracy"]


@pytest.mark.slow
def test_finetune_runs_under_torchrun_from_the_command_line(tiny_llama, word_data, tmp_path):
    result = run_module(finetune_args(tiny_llama, word_data, tmp_path / "run", "--steps", "2"), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_without_torchrun_a_run_is_one_process_that_owns_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = start_processes()
    assert (procs.rank, procs.world, procs.main, procs.owns_group) == (0, 1, True, False)
    assert procs.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert procs.all_sum([1.5, 2.0]) == [1.5, 2.0]  # nothing to add up with


def test_a_process_group_started_elsewhere_is_not_ended_by_the_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as a script that set it up itself
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    procs = start_processes()
    assert (procs.rank, procs.world, procs.main, procs.owns_group) == (1, 2, False, False)
    assert isinstance(procs, Processes)


def test_the_torch_floor_has_every_torch_api_lorakit_imports():
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_requirement = next(r for r in requirements if r.startswith("torch"))
    floor = re.fullmatch(r"torch>=(\d+)\.(\d+)", torch_requirement.split(";")[0].strip())
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 6)  # torch.distributed.fsdp.fully_shard, for --fsdp


def test_fsdp_on_a_torch_without_fully_shard_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")
    with pytest.raises(ValueError, match=r"--fsdp needs torch >= 2\.6"):
        fully_shard_api()
