"""DoRA (lorakit.engine.dora) against the paper's formula and against the real PEFT: the same outputs, gradients
and files both ways, for Linear, Conv1D, Embedding and Conv1d/2d/3d layers; merging, unmerging, several adapters,
switching off, and what is refused."""

import copy

import pytest
import torch
from helpers import build_tiny_gpt2, build_tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit as lk
from lorakit.engine import dora
from lorakit.engine import model as engine_model

ATOL = 1e-5
TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


class EveryKind(nn.Module):
    """Embedding, Conv1d, Conv2d, Conv3d and Linear layers in one small model: tokens (batch, 8) -> (batch, 5)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.lin = nn.Linear(6 + 4 * 8 + 2, 5)

    def forward(self, tokens):
        e = self.emb(tokens)  # (batch, 8, 8)
        a = self.c1(e.transpose(1, 2)).mean(-1)  # (batch, 6)
        b = self.c2(e.unsqueeze(1)).mean(-1).flatten(1)  # (batch, 32)
        c = self.c3(e[:, None, None].expand(-1, 1, 2, -1, -1)).mean((-1, -2, -3))  # (batch, 2)
        return self.lin(torch.cat([a, b, c], 1))


def build_every_kind():
    torch.manual_seed(0)
    return EveryKind().eval()


EVERY_KIND_TOKENS = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))

# (build, inputs, lorakit config, PEFT config) of one adapter
CASES = {
    "every-kind": (
        build_every_kind,
        {"tokens": EVERY_KIND_TOKENS},
        {"r": 2, "alpha": 3, "target_modules": ["emb", "c1", "c2", "c3", "lin"]},
        {"r": 2, "lora_alpha": 3, "target_modules": ["emb", "c1", "c2", "c3", "lin"]},
    ),
    "llama": (
        build_tiny_llama,
        {"input_ids": TOKENS},
        {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    ),
    "gpt2-conv1d": (
        build_tiny_gpt2,
        {"input_ids": TOKENS},
        {"r": 4, "alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def scramble_magnitudes(params):
    """Move each magnitude off its starting value ‖W + s·B·A‖, as training would."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in params:
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def ours(case):
    build, _, config, _ = CASES[case]
    model = lk.inject(build(), lk.LoraConfig(**config, init=False, use_dora=True))
    scramble_magnitudes(p for k, p in engine_model.adapter_parameters(model).items() if "magnitude" in k)
    return model


def peft_twin(case, model, **extra):
    """A PEFT DoRA model (PEFT config `extra` added) holding the factors and magnitudes of lorakit's `model`."""
    build, _, _, config = CASES[case]
    peft_config = PeftLoraConfig(**config, **extra, init_lora_weights=False, use_dora=True)
    theirs = get_peft_model(build(), peft_config).eval()
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, p in engine_model.adapter_parameters(model).items():
            peft_name = key.replace(".lora_A.weight", ".lora_A.default.weight")
            peft_name = peft_name.replace(".lora_B.weight", ".lora_B.default.weight")
            peft_name = peft_name.replace(".lora_embedding_A", ".lora_embedding_A.default")
            peft_name = peft_name.replace(".lora_embedding_B", ".lora_embedding_B.default")
            peft_name = peft_name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
            named[peft_name].copy_(p)
    return theirs


@pytest.mark.parametrize("case", CASES)
def test_a_peft_dora_adapter_loads_with_peft_outputs(case, tmp_path):
    build, inputs, _, config = CASES[case]
    theirs = get_peft_model(build(), PeftLoraConfig(**config, init_lora_weights=False, use_dora=True)).eval()
    scramble_magnitudes(p for n, p in theirs.named_parameters() if "magnitude" in n)
    expected = outputs(theirs, inputs)
    theirs.save_pretrained(tmp_path / "adapter")
    model = lk.load_adapter(build(), tmp_path / "adapter")
    assert not torch.allclose(outputs(build(), inputs), expected, atol=1e-3)
    torch.testing.assert_close(outputs(model, inputs), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", CASES)
def test_a_lorakit_dora_adapter_loads_in_peft_with_the_same_outputs(case, tmp_path):
    build, inputs, _, _ = CASES[case]
    model = ours(case)
    lk.save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(outputs(theirs, inputs), outputs(model, inputs), atol=ATOL, rtol=ATOL)


def test_magnitudes_are_saved_under_peft_keys_in_peft_shapes(tmp_path):
    model = ours("every-kind")
    shapes = {k: tuple(v.shape) for k, v in lk.lora_state_dict(model).items() if "magnitude" in k}
    p = "base_model.model."
    assert shapes == {
        f"{p}emb.lora_magnitude_vector": (8,),  # one per embedding dimension
        f"{p}c1.lora_magnitude_vector": (1, 6, 1),  # one per output channel
        f"{p}c2.lora_magnitude_vector": (1, 4, 1, 1),
        f"{p}c3.lora_magnitude_vector": (1, 2, 1, 1, 1),
        f"{p}lin.lora_magnitude_vector": (5,),  # one per output feature
    }


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_peft_gradients(case):
    inputs = CASES[case][1]
    model = ours(case)
    theirs = peft_twin(case, model)
    for m in (model, theirs):
        out = m(**inputs)
        (out.logits if hasattr(out, "logits") else out).square().mean().backward()
    named = {n.replace(".default", ""): p for n, p in theirs.named_parameters()}
    for key, p in engine_model.adapter_parameters(model).items():
        q = named[key] if key in named else named[f"{key}.weight"]
        assert p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=key)


def test_with_dropout_both_terms_take_the_dropped_input_as_in_peft():
    """Training with dropout: W x' and B A x' on the same dropped input x'; the same draws give PEFT's values."""
    build, inputs, config, _ = CASES["llama"]
    model = lk.inject(build(), lk.LoraConfig(**config, dropout=0.3, init=False, use_dora=True))
    scramble_magnitudes(p for k, p in engine_model.adapter_parameters(model).items() if "magnitude" in k)
    theirs = peft_twin("llama", model, lora_dropout=0.3)
    model.train(), theirs.train()
    torch.manual_seed(5)
    got = model(**inputs).logits
    torch.manual_seed(5)
    expected = theirs(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def test_the_output_is_the_papers_formula():
    """y = base(x) + (c − 1) ⊙ W x + c ⊙ s·B A x, c = m / ‖W + s·B·A‖ per output row, on a Linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["0"], init=False, use_dora=True))
    layer = model[0]
    W, b = layer.base.weight, layer.base.bias
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 1.5, 6))
    s = 6 / 3
    c = m / torch.linalg.vector_norm(W + s * B @ A, dim=1)
    x = torch.randn(4, 7, 10)
    expected = x @ W.T + b + (c - 1) * (x @ W.T) + c * (s * (x @ A.T) @ B.T)
    torch.testing.assert_close(model(x), expected)


def test_the_factored_norm_equals_the_norm_of_the_formed_weight():
    torch.manual_seed(0)
    W, A, B = torch.randn(30, 40, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64), torch.randn(30, 5)
    B = B.double()
    expected = torch.linalg.vector_norm(W + 0.7 * B @ A, dim=1)
    got = dora.row_norms(W, A, B, 0.7, W.square().sum(1))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_a_fresh_dora_adapter_changes_nothing_and_its_magnitude_is_the_weight_norm():
    torch.manual_seed(0)
    model = build_tiny_llama()
    before = outputs(model, {"input_ids": TOKENS})
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(outputs(model, {"input_ids": TOKENS}), before, atol=1e-6, rtol=1e-6)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude["default"], layer.base.weight.norm(dim=1))


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_merge_and_unload_give_the_unmerged_outputs(case):
    _, inputs, _, _ = CASES[case]
    model = ours(case)
    unmerged = outputs(model, inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lk.merge(model)
    torch.testing.assert_close(outputs(model, inputs), unmerged, atol=ATOL, rtol=ATOL)
    lk.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6, msg=key)
    plain = lk.merge_and_unload(copy.deepcopy(model))
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(outputs(plain, inputs), unmerged, atol=ATOL, rtol=ATOL)
    theirs = peft_twin(case, model).merge_and_unload()
    torch.testing.assert_close(outputs(theirs, inputs), unmerged, atol=ATOL, rtol=ATOL)


def test_the_fast_linear_path_gives_the_plain_formulas_values_and_gradients():
    """LoraLinear with one DoRA adapter runs DoraLinearFunction; with dropout in training, dora.update. The two
    agree wherever both apply (dropout 0)."""
    for fan_in_fan_out in (False, True):
        torch.manual_seed(0)
        build, inputs, config, _ = CASES["gpt2-conv1d" if fan_in_fan_out else "llama"]
        fast = lk.inject(build(), lk.LoraConfig(**config, init=False, use_dora=True, bias="all"))
        scramble_magnitudes(p for k, p in engine_model.adapter_parameters(fast).items() if "magnitude" in k)
        plain = copy.deepcopy(fast)
        for _, layer in engine_model.lora_layers(plain):
            layer.fusable = False  # the plain formula, LoraLayer.forward
        results = []
        for model in (fast, plain):
            loss = model(**inputs).logits.square().mean()
            loss.backward()
            results.append((loss, {k: p.grad for k, p in engine_model.adapter_parameters(model).items()}))
        torch.testing.assert_close(results[0][0], results[1][0])
        for key, grad in results[1][1].items():
            torch.testing.assert_close(results[0][1][key], grad, atol=1e-6, rtol=1e-4, msg=key)


def test_norms_follow_factors_changed_in_place_between_calls():
    """The norm is kept while W, A, B are unchanged; an optimizer step or a copy into a factor renews it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["0"], init=False, use_dora=True))
    layer, x = model[0], torch.randn(4, 10)
    with torch.no_grad():
        model(x)
        layer.lora_B["default"].mul_(3)
        got = model(x)
    W, A, B, m = layer.base.weight, layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]
    s = layer.scale["default"]
    c = m / torch.linalg.vector_norm(W + s * B @ A, dim=1)
    torch.testing.assert_close(got, x @ W.T + layer.base.bias + (c - 1) * (x @ W.T) + c * (s * (x @ A.T) @ B.T))


def test_several_adapters_add_up_and_merge_and_unmerge_exactly_that():
    """Two DoRA adapters and a plain one, all active: each adds its own update against the base weight, and
    merging them writes that sum; switching to one alone gives PEFT's outputs for it."""
    build, inputs, config, _ = CASES["llama"]
    model = build()
    for name, use_dora in (("a", True), ("b", True), ("plain", False)):
        torch.manual_seed(len(name))
        lk.inject(model, lk.LoraConfig(**config, init=False, use_dora=use_dora), adapter=name)
    scramble_magnitudes(p for n, p in model.named_parameters() if "magnitude" in n)
    singles = {}
    for name in ("a", "b", "plain"):
        lk.set_adapter(model, name)
        singles[name] = outputs(model, inputs)
    lk.set_adapter(model, ["a", "b", "plain"])
    together = outputs(model, inputs)
    lk.set_adapter(model, [])
    base = outputs(model, inputs)
    # each layer adds its updates; through the whole network the sum is not the sum of outputs, so check a layer
    lk.set_adapter(model, ["a", "b", "plain"])
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    expected = layer.base(x)
    with torch.no_grad():
        for name in ("a", "b"):
            expected = expected + dora.update(layer, x, layer.base(x), name)
        expected = expected + layer.adapter_output(x, "plain")
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=ATOL)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lk.merge(model)
    torch.testing.assert_close(outputs(model, inputs), together, atol=ATOL, rtol=ATOL)
    lk.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6, msg=key)
    assert not torch.allclose(together, base)
    # delete a merged adapter: the others stay merged, exactly as if merged alone
    lk.merge(model)
    lk.delete_adapter(model, "a")
    lk.unmerge(model)
    lk.set_adapter(model, "b")
    torch.testing.assert_close(outputs(model, inputs), singles["b"], atol=ATOL, rtol=ATOL)


def test_a_dora_adapter_switched_off_leaves_the_base_model():
    model = ours("llama")
    inputs = {"input_ids": TOKENS}
    with lk.disabled(model):
        torch.testing.assert_close(outputs(model, inputs), outputs(build_tiny_llama(), inputs), atol=0, rtol=0)


def test_mixed_batches_refuse_dora_adapters_as_peft_does():
    model = ours("llama")
    with pytest.raises(ValueError, match=r"mixed batches do not take DoRA adapters \(default\)"):
        lk.forward_per_sample(model, ["default", "__base__"], input_ids=TOKENS)


def test_an_unmerged_dora_adapter_beside_merged_ones_is_refused():
    """Its norm and W x need the base weight, which then holds the merged adapters."""
    build, inputs, config, _ = CASES["llama"]
    model = lk.inject(build(), lk.LoraConfig(**config, init=False), adapter="plain")
    lk.inject(model, lk.LoraConfig(**config, use_dora=True), adapter="d")
    lk.set_adapter(model, "plain")
    lk.merge(model)
    lk.set_adapter(model, ["plain", "d"])
    with pytest.raises(ValueError, match=r"DoRA adapter 'd' cannot run unmerged beside merged adapters \['plain'\]"):
        outputs(model, inputs)


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.Conv2d(4, 4, 3, groups=2), r"DoRA on a grouped convolution \(groups=2\) is not supported"),
        (nn.MultiheadAttention(8, 2), r"DoRA is not supported on an nn.MultiheadAttention \(nor in PEFT\)"),
    ],
)
def test_dora_refuses_grouped_convolutions_and_multihead_attention_leaving_the_model_plain(layer, message):
    model = nn.Sequential(layer, nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert type(model[0]) is type(layer) and type(model[1]) is nn.Linear and lk.adapter_names(model) == []


def test_dora_refuses_lora_bias_and_target_parameters_in_the_config():
    with pytest.raises(ValueError, match="use_dora with lora_bias is not supported"):
        lk.LoraConfig(r=2, target_modules=["0"], use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="target_parameters work without dropout, use_dora and lora_bias"):
        lk.LoraConfig(r=2, target_parameters=["0.weight"], use_dora=True)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(reentrant):
    def adapter_grads(checkpointing):
        model = ours("llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        return {key: p.grad for key, p in engine_model.adapter_parameters(model).items()}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-6, rtol=1e-5, msg=key)
