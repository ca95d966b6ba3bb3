"""`lorakit finetune` (lorakit.cli.finetune): the adapter it writes loads in lorakit and in PEFT with the same
outputs, its flags do what they say, and bad input exits 2 with one line and leaves an earlier adapter alone."""

import json
import math
import os

import pytest
import torch
from helpers import cli_error, finetune_args, write_jsonl

import lorakit as lk
from lorakit.cli import main
from lorakit.training.loop import linear_schedule
from lorakit.training.metrics import read_metrics


def test_finetune_writes_an_adapter_that_lorakit_and_peft_load_with_the_same_outputs(tiny_llama, word_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    # with lm_head adapted too: a random tiny Llama's frozen head caps how far its logits can move
    argv = finetune_args(tiny_llama, word_data, out, "--steps", "20", "--batch-size", "8", "--lr", "3e-2")
    assert main([*argv, "--targets", "q_proj,v_proj,down_proj,lm_head"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "train_config.json"):
        assert (out / name).is_file(), name
    data_record, *records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert data_record == {"step": 0, "train_examples": 64, "train_truncated": 0, "train_dropped": 0}
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


def test_finetune_with_dora_learns_and_writes_an_adapter_peft_loads_with_the_same_outputs(
    tiny_llama, word_data, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = finetune_args(tiny_llama, word_data, out, "--steps", "12", "--batch-size", "8", "--lr", "3e-2")
    assert main([*argv, "--targets", "q_proj,v_proj,down_proj,lm_head", "--use-dora"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tokens = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda m, d, o: finetune_args(o.parent / "missing-model", d, o), "no model directory at"),
        (lambda m, d, o: finetune_args(m, d.parent / "missing.jsonl", o), "no data file at"),
        (lambda m, d, o: finetune_args(m, d, o, "--r", "0"), "--rank must be a positive integer"),
        (lambda m, d, o: finetune_args(m, d, o, "--max-length", "1"), "--max-length must be an integer of at least 2"),
        (lambda m, d, o: finetune_args(m, d, o, "--lr", "inf"), "--lr must be a positive number, got inf"),
        (lambda m, d, o: finetune_args(m, d, o, "--text-field", "body"), "line 1 has no field 'body'"),
        (lambda m, d, o: finetune_args(m, d, o, "--task", "seq-cls"), "no row has the label field 'label'"),
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
    code = main([*make_argv(tiny_llama, word_data, out), "--overwrite"])  # nothing is removed before the checks
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("lorakit: error:")
    assert (out / "adapter_model.safetensors").read_bytes() == b"the previous adapter"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_seq_cls_with_a_single_label_is_refused(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "the cat sat", "label": "pets"}] * 8)
    assert main(finetune_args(tiny_llama, data, tmp_path / "run", "--task", "seq-cls")) == 2
    assert "seq-cls needs at least two different labels, and all are 'pets'" in capsys.readouterr().err


@pytest.mark.parametrize("bad_data", ['{"text": "ok"}\n{"text": broken\n', "\n"])
def test_malformed_or_empty_data_exits_2(tiny_llama, tmp_path, capsys, bad_data):
    data = tmp_path / "data.jsonl"
    data.write_text(bad_data)
    assert main(finetune_args(tiny_llama, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid JSON" in err or "the dataset is empty" in err
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused_before_training(tiny_llama, word_data, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert main(finetune_args(tiny_llama, word_data, tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == f"lorakit: error: --out {tmp_path / 'run'} exists and is not a directory"


# -- chat and instruction data ---------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}]


def test_eval_every_logs_eval_loss_and_perplexity_of_the_answers(tiny_chat_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 8)
    out = tmp_path / "run"
    argv = finetune_args(tiny_chat_llama, data, out, "--eval-data", str(data), "--eval-every", "2", "--steps", "4")
    assert main([*argv, "--batch-size", "4"]) == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_a_chat_template_file_trains_messages_and_is_kept_beside_the_adapter(tiny_llama, tmp_path):
    from helpers import CHATML

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]}] * 8,
    )
    out = tmp_path / "run"
    assert main(finetune_args(tiny_llama, data, out, "--chat-template", str(template), "--steps", "1")) == 0
    assert (out / "chat_template.jinja").read_text() == CHATML


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"messages": CHAT}], [], "messages need a chat template, and the tokenizer has none"),
        ([{"messages": [{"role": "wizard", "content": "hi"}]}], [], "line 1: message 0 has the unknown role 'wizard'"),
        ([{"messages": CHAT[:1]}], [], "line 1: the conversation has no assistant turn"),
        (
            [{"prompt": "a", "completion": 3}],
            [],
            "line 1: 'prompt' and 'completion' must both be text or both be lists",
        ),
        (
            [{"text": "the cat"}, {"prompt": "a", "completion": "b"}],
            [],
            "line 2: a prompt-completion row in a file of text",
        ),
        ([{"text": "the cat sat"}], ["--chat-template", "BAD"], "line 1: not a valid Jinja template"),
        ([{"text": "the cat sat"}], ["--task", "seq-cls", "--packing"], "--packing, --format and --chat-template are"),
    ],
    ids=["no-template", "role", "no-answer", "types", "mixed", "bad-jinja", "packing-seq-cls"],
)
def test_bad_chat_data_exits_2_naming_the_file_and_line_and_writes_nothing(
    tiny_llama, tmp_path, capsys, rows, extra, message
):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m }")
    out = tmp_path / "run"
    extra = [str(bad) if e == "BAD" else e for e in extra]
    err = " ".join(cli_error(finetune_args(tiny_llama, data, out, *extra), capsys).split())
    assert message in err, err
    assert not out.exists()
