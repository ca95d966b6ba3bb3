"""`lorakit merge` (lorakit.cli.merge): it writes a model directory that transformers loads with the adapted
model's outputs and says where and how big; bad input exits 2 with one line and writes nothing."""

import os

import pytest
import torch
from helpers import cli_error, run_cli, tree
from safetensors.torch import load_file

import lorakit as lk
from lorakit.engine.model import adapter_parameters

TOKENS = torch.tensor([[4, 2, 30, 41, 8, 3, 2, 5]])  # ids of the tiny chat Llama's vocabulary (66 tokens)


def adapted(model_dir, targets=("q_proj", "v_proj", "lm_head")):
    """The model in `model_dir` with a non-zero adapter (B starts at zero: both factors randomised instead)."""
    from transformers import AutoModelForCausalLM

    model = lk.inject(
        AutoModelForCausalLM.from_pretrained(model_dir).eval(), lk.LoraConfig(r=4, target_modules=list(targets))
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture(scope="module")
def adapter(tiny_chat_llama, tmp_path_factory):
    """(a saved non-zero adapter for the tiny chat Llama, the adapted model's logits on TOKENS)."""
    model = adapted(tiny_chat_llama)
    return lk.save_adapter(model, tmp_path_factory.mktemp("run") / "adapter"), logits(model)


def merge_args(model, adapter, out, *extra):
    return ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out), *extra]


def test_merge_writes_a_model_that_transformers_loads_with_the_adapted_logits(
    tiny_chat_llama, adapter, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(capsys, *merge_args(tiny_chat_llama, adapter[0], out))
    assert (code, stderr) == (0, "")
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e3
    assert stdout == f"merged model written to {out}/ ({size:.1f} kB)\n"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(model), adapter[1], atol=1e-4, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_chat_llama).chat_template
    )


def test_dtype_bfloat16_writes_bfloat16_weights(tiny_chat_llama, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli(capsys, *merge_args(tiny_chat_llama, adapter[0], out, "--dtype", "bfloat16"))[0] == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_help_names_every_flag_and_the_dtype_default(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "merge", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model DIR", "--adapter DIR", "--out DIR", "--dtype {float32,bfloat16,float16}"):
        assert flag in text
    assert "(default: the base model's own)" in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "no model directory at"),
        ("missing adapter", "no adapter directory at"),
        ("out is the adapter", "is the adapter directory"),
        ("out inside the model", "is inside the model directory"),
        ("out not empty", "exists and is not empty: remove it or choose another --out"),
        ("unknown dtype", "--dtype must be one of float32, bfloat16, float16, got 'fp8'"),
        ("adapter of another model", "does not fit the model in"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tiny_chat_llama, tiny_llama, adapter, tmp_path, capsys, case, message
):
    model, adapter_dir, out, extra = tiny_chat_llama, adapter[0], tmp_path / "out", []
    if case == "missing model":
        model = tmp_path / "no-model"
    elif case == "missing adapter":
        adapter_dir = tmp_path / "no-adapter"
    elif case == "out is the adapter":
        out = adapter_dir
    elif case == "out inside the model":
        out = tiny_chat_llama / "merged"
    elif case == "out not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unknown dtype":
        extra = ["--dtype", "fp8"]
    else:  # the other tiny Llama's vocabulary has another size: its lm_head adapter cannot fit
        adapter_dir = lk.save_adapter(adapted(tiny_llama), tmp_path / "other-adapter")
    inputs = {p: tree(p) for p in (tiny_chat_llama, adapter[0])}
    listing = sorted(os.listdir(tmp_path))
    err = cli_error(merge_args(model, adapter_dir, out, *extra), capsys)
    assert len(err.strip().splitlines()) == 1 and message in err
    assert sorted(os.listdir(tmp_path)) == listing  # no --out, no temporary directory
    assert {p: tree(p) for p in inputs} == inputs


def test_a_failure_mid_save_exits_2_and_leaves_no_out_and_no_temporary(
    tiny_chat_llama, adapter, tmp_path, capsys, monkeypatch
):
    from transformers import LlamaForCausalLM

    def failing_save(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", failing_save)
    err = cli_error(merge_args(tiny_chat_llama, adapter[0], tmp_path / "out"), capsys)
    assert "No space left on device" in err
    assert os.listdir(tmp_path) == []
