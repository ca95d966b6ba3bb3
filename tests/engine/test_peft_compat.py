"""lorakit against the real PEFT: the same files, the same outputs, the same parameter counts.

For each model (tiny transformers models built from configs, a CNN, an embedding model):
- a lorakit adapter saved with `lk.save_adapter` and loaded by `PeftModel.from_pretrained` gives the same outputs;
- a PEFT adapter saved with `save_pretrained` and loaded by `lk.load_adapter` gives the same outputs;
- merged and unmerged lorakit outputs agree;
- `lk.inject` and `get_peft_model` train the same number of parameters.
"""

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from helpers import build_tiny_gpt2, build_tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine.layers import LoraLinear

ATOL = 1e-5


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.head = nn.Linear(8 * 4 * 8, 10)

    def forward(self, x):  # (batch, 3, 8, 8) -> (batch, 10)
        h = torch.relu(self.conv1(x))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 4)

    def forward(self, tokens):  # (batch, L) -> (batch, L, 4)
        return self.proj(self.emb(tokens))


@dataclass
class Case:
    name: str
    build: Any  # () -> model in eval mode, same weights every call
    inputs: Any  # () -> kwargs for the forward pass
    lorakit: dict  # LoraConfig kwargs
    peft: dict = field(default_factory=dict)  # PEFT LoraConfig kwargs for the same adapter


def seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory().eval()

    return build


TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
# 64 tokens: past every tiny layer's break-even, so lorakit's inference forms W + s·B·A for the call
LONG_TOKENS = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(6))

GPT2_CASE = Case(
    "gpt2-conv1d",
    build_tiny_gpt2,
    lambda: {"input_ids": TOKENS},
    {"r": 4, "alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"]},
    {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
)

BERT_CASE = Case(
    "bert-seq-cls",
    seeded(
        lambda: BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=100,
                num_labels=3,
            )
        )
    ),
    lambda: {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)},
    {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
    {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
)

CASES = [
    Case(
        "llama",
        build_tiny_llama,
        lambda: {"input_ids": TOKENS},
        {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]},
    ),
    Case(
        "llama-all-linear-rslora-patterns",
        build_tiny_llama,
        lambda: {"input_ids": TOKENS},
        {
            "r": 4,
            "alpha": 6,
            "target_modules": "all-linear",
            "use_rslora": True,
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"layers\\.1\\..*v_proj": 3},
        },
        {
            "r": 4,
            "lora_alpha": 6,
            "target_modules": "all-linear",
            "use_rslora": True,
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"layers\\.1\\..*v_proj": 3},
        },
    ),
    GPT2_CASE,
    Case(
        "llama-long-inputs",
        build_tiny_llama,
        lambda: {"input_ids": LONG_TOKENS},
        {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    ),
    replace(GPT2_CASE, name="gpt2-conv1d-long-inputs", inputs=lambda: {"input_ids": LONG_TOKENS}),
    BERT_CASE,
    # bias="all": PEFT also saves the classifier wrapper's biases under their inner names
    replace(
        BERT_CASE,
        name="bert-seq-cls-bias-all",
        lorakit={**BERT_CASE.lorakit, "bias": "all"},
        peft={**BERT_CASE.peft, "bias": "all"},
    ),
    Case(
        "cnn-conv2d",
        seeded(SmallCNN),
        lambda: {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))},
        {"r": 3, "alpha": 6, "target_modules": ["conv1", "conv2", "head"]},
        {"r": 3, "lora_alpha": 6, "target_modules": ["conv1", "conv2", "head"]},
    ),
    Case(
        "embedding",
        seeded(EmbeddingModel),
        lambda: {"tokens": torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(5))},
        {"r": 4, "alpha": 4, "target_modules": ["emb", "proj"]},
        {"r": 4, "lora_alpha": 4, "target_modules": ["emb", "proj"]},
    ),
]


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def randomize(params):
    """Make an adapter non-zero (B starts at zero), as training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lorakit_adapted(case):
    model = lk.inject(case.build(), lk.LoraConfig(**case.lorakit))
    randomize(engine_model.adapter_parameters(model).values())
    return model


def peft_adapted(case):
    model = get_peft_model(case.build(), PeftLoraConfig(**case.peft))
    randomize(p for n, p in model.named_parameters() if p.requires_grad)
    return model


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lorakit_adapter_loads_in_peft_with_identical_outputs(case, tmp_path):
    model = lorakit_adapted(case)
    expected = logits(model, case.inputs())
    lk.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(case.build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, case.inputs()), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_peft_adapter_loads_in_lorakit_with_identical_outputs(case, tmp_path):
    peft_model = peft_adapted(case).eval()
    expected = logits(peft_model, case.inputs())
    peft_model.save_pretrained(tmp_path / "adapter")
    model = lk.load_adapter(case.build(), tmp_path / "adapter")
    torch.testing.assert_close(logits(model, case.inputs()), expected, atol=ATOL, rtol=ATOL)
    # switched off, the adapter leaves what PEFT's leaves: the base model, unless the adapter trains its biases
    with peft_model.disable_adapter():
        expected_off = logits(peft_model, case.inputs())
    if case.peft.get("bias", "none") == "none":
        torch.testing.assert_close(expected_off, logits(case.build(), case.inputs()), atol=0, rtol=0)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model, case.inputs()), expected_off, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama-long-inputs", "gpt2-conv1d-long-inputs"])
def test_long_input_cases_take_the_formed_weight_path(name):
    case = next(c for c in CASES if c.name == name)
    layers = [m for m in lorakit_adapted(case).modules() if isinstance(m, LoraLinear)]
    assert layers and all(LONG_TOKENS.numel() >= layer.merge_from_tokens for layer in layers)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_merged_and_unmerged_outputs_agree(case):
    model = lorakit_adapted(case)
    unmerged = logits(model, case.inputs())
    lk.merge(model)
    torch.testing.assert_close(logits(model, case.inputs()), unmerged, atol=ATOL, rtol=ATOL)
    lk.unmerge(model)
    plain = lk.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(plain, case.inputs()), unmerged, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_trainable_parameter_count_equals_peft(case):
    ours = lk.parameter_counts(lk.inject(case.build(), lk.LoraConfig(**case.lorakit)))
    peft_model = get_peft_model(case.build(), PeftLoraConfig(**case.peft))
    assert ours == peft_model.get_nb_trainable_parameters()


def peft_key(key: str) -> str:
    """lorakit's parameter name of a factor as PEFT names it for adapter "default"."""
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def twins(case: Case) -> tuple[nn.Module, nn.Module]:
    """A lorakit and a PEFT model with the same random, non-zero factors."""
    ours = lk.inject(case.build(), lk.LoraConfig(**case.lorakit, init=False))
    theirs = get_peft_model(case.build(), PeftLoraConfig(**case.peft, init_lora_weights=False)).eval()
    with torch.no_grad():
        for key, p in engine_model.adapter_parameters(ours).items():
            dict(theirs.named_parameters())[peft_key(key)].copy_(p)
    return ours, theirs


def test_peft_outputs_match_lorakit_outputs_for_the_same_factors():
    """Not just files: the two forward passes agree given the same A and B."""
    case = CASES[0]
    ours, theirs = twins(case)
    torch.testing.assert_close(logits(ours, case.inputs()), logits(theirs, case.inputs()), atol=ATOL, rtol=ATOL)


def test_under_bfloat16_autocast_loss_and_gradients_match_peft():
    """Autocast (transformers' Trainer with bf16=True) picks each op's dtype: fp32 factors, bf16 products."""
    ours, theirs = twins(CASES[0])
    for model in (ours, theirs):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss = model(input_ids=TOKENS, labels=TOKENS).loss
        model.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss)
    peft_params = dict(theirs.named_parameters())
    for key, p in engine_model.adapter_parameters(ours).items():
        torch.testing.assert_close(p.grad, peft_params[peft_key(key)].grad, atol=1e-2, rtol=2e-2)


def test_mixed_batch_under_bfloat16_autocast_matches_peft():
    ours, theirs = twins(CASES[0])
    order, inputs = ["default", "__base__"], {"input_ids": TOKENS}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        expected = theirs(**inputs, adapter_names=order).logits
        got = lk.forward_per_sample(ours, order, **inputs).logits
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


def test_linears_inside_modules_to_save_get_no_adapter_and_peft_loads_the_file(tmp_path):
    """RoBERTa's classification head holds two Linears: all-linear with the head in modules_to_save adapts
    neither (the head trains as a full copy), as PEFT decides."""
    config = RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config).eval()
    settings = {"r": 2, "target_modules": "all-linear", "modules_to_save": ["classifier"]}
    ours = lk.inject(copy.deepcopy(model), lk.LoraConfig(**settings, init=False))
    theirs = get_peft_model(copy.deepcopy(model), PeftLoraConfig(**settings))
    adapted_by_peft = {
        name.removeprefix("base_model.model.") for name, m in theirs.named_modules() if isinstance(m, PeftLoraLayer)
    }
    assert {path for path, _ in engine_model.lora_layers(ours)} == adapted_by_peft
    assert not any(path.startswith("classifier") for path in adapted_by_peft)
    lk.save_adapter(ours, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    inputs = {"input_ids": TOKENS}
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), atol=ATOL, rtol=ATOL)


def test_peft_adapter_on_embed_tokens_with_saved_base_layer_loads(tmp_path):
    """PEFT also saves the full base weight of an adapted embed_tokens; lorakit reads it."""
    case = CASES[0]
    config = PeftLoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "q_proj"])
    peft_model = get_peft_model(case.build(), config)
    randomize(p for n, p in peft_model.named_parameters() if p.requires_grad)
    expected = logits(peft_model.eval(), case.inputs())
    peft_model.save_pretrained(tmp_path / "adapter")
    model = lk.load_adapter(case.build(), tmp_path / "adapter")
    torch.testing.assert_close(logits(model, case.inputs()), expected, atol=ATOL, rtol=ATOL)


def test_named_adapters_from_peft_and_mixed_batches_match_peft(tmp_path):
    case = CASES[0]
    peft_model = get_peft_model(case.build(), PeftLoraConfig(**case.peft, init_lora_weights=False), adapter_name="a")
    peft_model.add_adapter("b", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "saved")  # "a" and "b" go to subfolders
    model = case.build()
    lk.load_adapter(model, tmp_path / "saved" / "a", adapter="a")
    lk.load_adapter(model, tmp_path / "saved" / "b", adapter="b")
    order = ["a", "b", "__base__", "a"]
    inputs = {"input_ids": TOKENS.repeat(2, 1)}
    with torch.no_grad():
        theirs = peft_model(**inputs, adapter_names=order).logits
    ours = logits_per_sample(model, order, inputs)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


def logits_per_sample(model, order, inputs):
    with torch.no_grad():
        return lk.forward_per_sample(model, order, **inputs).logits


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward():
    case = CASES[0]

    def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = lk.inject(case.build(), lk.LoraConfig(**case.lorakit, init=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        return {key: p.grad for key, p in engine_model.adapter_parameters(model).items()}

    checkpointed, plain = adapter_grads(True), adapter_grads(False)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-6, rtol=1e-5, msg=key)
