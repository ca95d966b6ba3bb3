"""`lorakit finetune --load-in-4bit / --load-in-8bit` (QLoRA) on the tiny Llama at hidden 64, against its float32
run, the real PEFT on transformers' own 4-bit base, and `lorakit merge`."""

import pytest
import torch
from helpers import WORDS, finetune_args, run_cli
from peft import PeftModel

import lorakit as lk
from lorakit.engine.model import lora_layers
from lorakit.engine.quantized import QuantizedLoraLinear
from lorakit.training.metrics import read_metrics
from lorakit.training.models import load_model_and_tokenizer

TOKENS = torch.randint(0, len(WORDS) + 3, (2, 9), generator=torch.Generator().manual_seed(3))  # the word vocabulary
STEPS = {"steps": 30, "batch_size": 8, "lr": 1e-2, "dropout": 0.0, "progress": False}


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_qlora_lowers_the_loss_as_the_float32_run_does(quantizable_llama, word_data, tmp_path):
    runs = {}
    for name, bits in (("float32", {}), ("4-bit", {"load_in_4bit": True}), ("8-bit", {"load_in_8bit": True})):
        lk.train(
            lk.TrainConfig(model=str(quantizable_llama), data=str(word_data), out=str(tmp_path / name), **bits, **STEPS)
        )
        runs[name] = losses(tmp_path / name)
    full = runs["float32"]
    assert full[-1] < 0.7 * full[0]
    for name in ("4-bit", "8-bit"):
        assert abs(runs[name][-1] - full[-1]) < 0.05 * full[-1], name


def test_load_in_4bit_and_8bit_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        lk.TrainConfig(model="m", data="d", out="o", load_in_4bit=True, load_in_8bit=True)


def test_quantized_base_loads_with_the_classification_head_in_full_precision(quantizable_llama):
    model, _ = load_model_and_tokenizer(str(quantizable_llama), "seq-cls", 3, "bfloat16", 4, keep=["score"])
    assert type(model.score) is torch.nn.Linear and model.score.weight.dtype == torch.bfloat16
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16


@pytest.mark.slow
def test_qlora_run_with_gradient_checkpointing_loads_in_peft_and_merges_to_full_precision(
    quantizable_llama, word_data, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "run"
    flags = ["--load-in-4bit", "--gradient-checkpointing", "--steps", "3", "--batch-size", "4", "--dropout", "0"]
    code, _, err = run_cli(capsys, *finetune_args(quantizable_llama, word_data, out, *flags))
    assert code == 0, err
    assert "kernels-community" not in err  # bitsandbytes' import warning, kept quiet

    ours, _ = load_model_and_tokenizer(str(quantizable_llama), "causal-lm", None, bits=4)
    lk.load_adapter(ours, out)
    assert all(isinstance(layer, QuantizedLoraLinear) for _, layer in lora_layers(ours))
    with torch.no_grad():
        expected = ours(input_ids=TOKENS).logits

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(quantizable_llama, quantization_config=config, device_map="cpu")
    theirs = PeftModel.from_pretrained(base, out).train()  # train mode: see tests/engine/test_quantized.py
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=1e-5)

    code, _, err = run_cli(
        capsys, "merge", "--model", quantizable_llama, "--adapter", out, "--out", tmp_path / "merged"
    )
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # a plain float32 model, as the base
    assert merged.dtype == torch.float32 and not merged.config.to_dict().get("quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
