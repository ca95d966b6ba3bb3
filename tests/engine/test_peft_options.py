"""PEFT's other LoRA options against the real PEFT, both ways (a PEFT file loads in lorakit with PEFT's outputs; a
lorakit file loads in PEFT with lorakit's): lora_bias, grouped convolutions, nn.MultiheadAttention,
target_parameters (stacked expert weights) and trainable_token_indices; merging where PEFT merges."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_gpt2, build_tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine.peft_format import UNSUPPORTED_PEFT_OPTIONS, config_from_peft

ATOL = 1e-5
TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


class Convs(nn.Module):
    """A grouped Conv2d and Conv1d beside plain ones, and a Linear head: images (batch, 4, 6, 6) -> (batch, 3)."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(4, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.grouped1d = nn.Conv1d(6, 4, 3, padding=1, groups=2, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.grouped(torch.relu(self.plain(x))).flatten(2)  # (batch, 6, 36)
        return self.head(self.grouped1d(h).mean(-1))


class Attention(nn.Module):
    """nn.MultiheadAttention between two Linears: (batch, L, 8) -> (batch, L, 8)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.proj(x)
        return self.mha(h, h, h, need_weights=False)[0]


class Experts(nn.Module):
    """A mixture-of-experts layer with stacked expert weights, as transformers' MoE blocks hold them: gate_up
    (experts × 2·hidden × dim) and down (experts × dim × hidden), (experts × out × in); each token goes through
    every expert, weighted by a router."""

    def __init__(self, experts=3, dim=8, hidden=6):
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * hidden, dim) / dim**0.5)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)

    def forward(self, x):  # (batch, L, dim)
        weights = self.router(x).softmax(-1)  # (batch, L, experts)
        gate, up = torch.einsum("bld,eod->bleo", x, self.gate_up).chunk(2, -1)
        out = torch.einsum("bleh,edh->bled", torch.nn.functional.silu(gate) * up, self.down)
        return (weights.unsqueeze(-1) * out).sum(2)


class TransposedExperts(Experts):
    """The same, its expert weights stored (experts × in × out) and marked `is_transposed`."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(self.gate_up.detach().transpose(1, 2).contiguous())

    def forward(self, x):
        weights = self.router(x).softmax(-1)
        gate, up = torch.einsum("bld,edo->bleo", x, self.gate_up).chunk(2, -1)
        out = torch.einsum("bleh,edh->bled", torch.nn.functional.silu(gate) * up, self.down)
        return (weights.unsqueeze(-1) * out).sum(2)


class MoE(nn.Module):
    def __init__(self, experts=Experts):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.moe = experts()
        self.out = nn.Linear(8, 4)

    def forward(self, tokens):
        return self.out(self.moe(self.embed(tokens)))


def seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory().eval()

    return build


IMAGES = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
SEQUENCE = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
MOE_TOKENS = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(6))

# name: (build, inputs, PEFT config; lorakit's is the same under its own names), each adapter non-zero
CASES = {
    "lora-bias-llama": (build_tiny_llama, {"input_ids": TOKENS}, {"target_modules": ["q_proj", "v_proj"]}),
    "lora-bias-convs": (seeded(Convs), {"x": IMAGES}, {"target_modules": ["plain", "head"]}),
    "grouped-convs": (seeded(Convs), {"x": IMAGES}, {"target_modules": ["grouped", "grouped1d", "plain"]}),
    "multihead-attention": (seeded(Attention), {"x": SEQUENCE}, {"target_modules": ["mha", "proj"]}),
    "expert-parameters": (
        seeded(MoE),
        {"tokens": MOE_TOKENS},
        {"target_modules": ["out"], "target_parameters": ["moe.gate_up", "moe.down"]},
    ),
    "transposed-expert-parameters": (
        seeded(lambda: MoE(TransposedExperts)),
        {"tokens": MOE_TOKENS},
        {"target_modules": None, "target_parameters": ["moe.gate_up", "out.weight"]},
    ),
    "parameters-llama": (
        build_tiny_llama,
        {"input_ids": TOKENS},
        # [], not None: PEFT gives target_modules=None on a Llama its default q_proj and v_proj
        {"target_modules": [], "target_parameters": ["self_attn.o_proj.weight", "mlp.up_proj.weight"]},
    ),
    "trainable-tokens-llama": (
        build_tiny_llama,
        {"input_ids": TOKENS},
        {"target_modules": ["q_proj"], "trainable_token_indices": [int(TOKENS[0, 0]), int(TOKENS[1, 3]), 99]},
    ),
    "trainable-tokens-tied-gpt2": (
        build_tiny_gpt2,
        {"input_ids": TOKENS},
        {"target_modules": ["c_attn"], "fan_in_fan_out": True, "trainable_token_indices": [int(TOKENS[0, 2]), 7]},
    ),
    "trainable-tokens-by-name": (
        seeded(MoE),
        {"tokens": MOE_TOKENS},
        {"target_modules": ["out"], "trainable_token_indices": {"embed": [int(MOE_TOKENS[0, 1]), 3]}},
    ),
}
for name in ("lora-bias-llama", "lora-bias-convs"):
    CASES[name][2]["lora_bias"] = True


def lorakit_config(peft: dict, **extra) -> lk.LoraConfig:
    options = {k: v for k, v in peft.items() if k != "fan_in_fan_out"}
    return lk.LoraConfig(r=4, alpha=6, **options, **extra)


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def peft_outputs(model, inputs):
    """PEFT's outputs, for a MultiheadAttention with its out_proj update counted once: PEFT 0.21 adds it twice, in
    its forward pass and its merge alike (MultiheadAttention.merge adds it, then merges out_proj's own LoRA layer),
    so it runs here with out_proj's B halved."""
    halved = [p for name, p in model.named_parameters() if "out_proj.lora_B." in name]
    with torch.no_grad():
        for p in halved:
            p.div_(2)
        try:
            return outputs(model, inputs)
        finally:
            for p in halved:
                p.mul_(2)


def randomize(params):
    """Every adapter tensor non-zero and away from its start, as after training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_adapted(case):
    build, _, config = CASES[case]
    model = get_peft_model(build(), PeftLoraConfig(r=4, lora_alpha=6, **config)).eval()
    randomize(p for n, p in model.named_parameters() if p.requires_grad)
    return model


def lorakit_adapted(case):
    build, _, config = CASES[case]
    model = lk.inject(build(), lorakit_config(config))
    randomize(engine_model.adapter_parameters(model).values())
    return model


@pytest.mark.parametrize("case", CASES)
def test_a_peft_adapter_loads_in_lorakit_with_peft_outputs(case, tmp_path):
    build, inputs, _ = CASES[case]
    theirs = peft_adapted(case)
    expected = peft_outputs(theirs, inputs)
    assert not torch.allclose(expected, outputs(build(), inputs), atol=1e-4)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = lk.load_adapter(build(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours, inputs), expected, atol=ATOL, rtol=ATOL)
    with lk.disabled(ours), theirs.disable_adapter():
        torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", CASES)
def test_a_lorakit_adapter_loads_in_peft_with_lorakit_outputs(case, tmp_path):
    build, inputs, _ = CASES[case]
    ours = lorakit_adapted(case)
    expected = outputs(ours, inputs)
    assert not torch.allclose(expected, outputs(build(), inputs), atol=1e-4)
    lk.save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_outputs(theirs, inputs), expected, atol=ATOL, rtol=ATOL)
    assert (
        lk.parameter_counts(lorakit_adapted(case))
        == get_peft_model(build(), PeftLoraConfig(r=4, lora_alpha=6, **CASES[case][2])).get_nb_trainable_parameters()
    )


MERGEABLE = [
    "lora-bias-convs",
    "multihead-attention",
    "expert-parameters",
    "transposed-expert-parameters",
    "parameters-llama",
]
MERGEABLE += ["trainable-tokens-llama", "trainable-tokens-tied-gpt2", "trainable-tokens-by-name"]


@pytest.mark.parametrize("case", MERGEABLE)
def test_merging_gives_the_unmerged_outputs_as_peft_merges(case):
    _, inputs, _ = CASES[case]
    ours = lorakit_adapted(case)
    unmerged = outputs(ours, inputs)
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    lk.merge(ours)
    torch.testing.assert_close(outputs(ours, inputs), unmerged, atol=ATOL, rtol=ATOL)
    lk.unmerge(ours)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6, msg=key)
    plain = lk.merge_and_unload(copy.deepcopy(ours))
    assert not any(isinstance(m, nn.ParameterDict) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, inputs), unmerged, atol=ATOL, rtol=ATOL)
    theirs = peft_adapted(case).merge_and_unload()
    peft_unmerged = outputs(peft_adapted(case), inputs)
    torch.testing.assert_close(outputs(theirs, inputs), peft_unmerged, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(
    "case, message",
    [
        ("grouped-convs", r"cannot merge into grouped: a grouped convolution \(groups=2\) cannot take the adapter"),
        ("lora-bias-llama", r"cannot merge into .*q_proj: lora_bias adds to the layer's bias .* has none"),
    ],
)
def test_merging_what_cannot_be_folded_is_refused_and_changes_nothing(case, message):
    ours = lorakit_adapted(case)
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        lk.merge_and_unload(ours)
    assert all(torch.equal(v, weights[k]) for k, v in ours.state_dict().items())


def test_a_grouped_convolutions_rank_must_be_a_multiple_of_its_groups():
    with pytest.raises(ValueError, match="rank 3 on a convolution with groups=2: the rank must be a multiple"):
        lk.inject(seeded(Convs)(), lk.LoraConfig(r=3, target_modules=["grouped"]))


def test_lora_bias_in_a_mixed_batch_matches_peft():
    build, _, config = CASES["lora-bias-llama"]
    theirs = peft_adapted("lora-bias-llama")
    theirs.add_adapter("other", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], lora_bias=True))
    randomize(p for n, p in theirs.named_parameters() if ".other." in n)
    ours = build()
    named = dict(theirs.named_parameters())
    lk.inject(ours, lorakit_config(config), "default")
    lk.inject(ours, lk.LoraConfig(r=2, alpha=4, target_modules=["v_proj"], lora_bias=True), "other")
    with torch.no_grad():
        for adapter in ("default", "other"):
            for key, p in engine_model.adapter_parameters(ours, adapter).items():
                peft_name = key.replace(".weight", f".{adapter}.weight").replace(".bias", f".{adapter}.bias")
                p.copy_(named[peft_name])
    order = ["other", "__base__", "default", "other"]
    batch = {"input_ids": TOKENS.repeat(2, 1)}
    with torch.no_grad():
        expected = theirs(**batch, adapter_names=order).logits
        got = lk.forward_per_sample(ours, order, **batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def test_lora_bias_and_trainable_tokens_refusals_are_clear():
    with pytest.raises(ValueError, match=r"lora_bias is not supported on an Embedding"):
        lk.inject(seeded(MoE)(), lk.LoraConfig(r=2, target_modules=["embed"], lora_bias=True))
    with pytest.raises(ValueError, match=r"trainable_token_indices: embed has 20 rows, no row 25"):
        lk.inject(seeded(MoE)(), lk.LoraConfig(r=2, target_modules=["out"], trainable_token_indices={"embed": [25]}))
    with pytest.raises(ValueError, match=r"trainable_token_indices names 'nowhere', which matches no module"):
        lk.inject(seeded(MoE)(), lk.LoraConfig(r=2, target_modules=["out"], trainable_token_indices={"nowhere": [1]}))
    with pytest.raises(ValueError, match=r"target_parameters=\['moe.nothing'\] matches no parameter"):
        lk.inject(seeded(MoE)(), lk.LoraConfig(r=2, target_parameters=["moe.nothing"]))
    with pytest.raises(ValueError, match="target_parameters work without dropout, use_dora and lora_bias"):
        lk.LoraConfig(r=2, target_parameters=["moe.down"], dropout=0.1)


def test_trainable_tokens_train_only_their_rows_and_tied_logits_follow():
    """GPT-2 ties its head to the embedding: the chosen rows train once and give both the inputs' embeddings and
    those tokens' logits; no other row of the weight moves."""
    build, inputs, config = CASES["trainable-tokens-tied-gpt2"]
    model = lk.inject(build(), lorakit_config(config))
    params = engine_model.adapter_parameters(model)
    rows = params["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (2, 32) and rows.requires_grad
    assert not any("lm_head" in key for key in params)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert rows.grad.abs().sum() > 0
    assert not model.transformer.wte.base.weight.requires_grad
    with torch.no_grad():
        rows.add_(1.0)
    logits = outputs(model.eval(), inputs)
    head_rows = model.lm_head.table().rows["default"]
    assert head_rows is rows
    hidden = model.transformer(**inputs).last_hidden_state
    torch.testing.assert_close(logits[..., config["trainable_token_indices"]], hidden @ rows.T, atol=1e-4, rtol=1e-4)


def test_multihead_attention_trains_both_projections_and_deletes_cleanly():
    model = seeded(Attention)()
    before = outputs(model, {"x": SEQUENCE})
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["mha"], init=False))
    model.train()
    model(SEQUENCE).square().mean().backward()
    grads = {k: p.grad for k, p in engine_model.adapter_parameters(model).items()}
    assert set(grads) == {
        "base_model.model.mha.lora_A.weight",
        "base_model.model.mha.lora_B.weight",
        "base_model.model.mha.base_layer.out_proj.lora_A.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.weight",
    }
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    lk.delete_adapter(model, "default")
    assert type(model.mha) is nn.MultiheadAttention
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(outputs(model.eval(), {"x": SEQUENCE}), before)


def test_parameters_inside_another_targeted_module_are_refused():
    with pytest.raises(ValueError, match=r"target_parameters pick parameters of moe and of moe\.router inside it"):
        lk.inject(seeded(MoE)(), lk.LoraConfig(r=2, target_parameters=["moe.down", "moe.router.weight"]))


def test_two_adapters_on_expert_parameters_switch_and_delete_back_to_the_plain_model():
    model = seeded(MoE)()
    plain = outputs(model, {"tokens": MOE_TOKENS})
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=2, target_parameters=["moe.gate_up", "moe.down"], init=False), name)
    assert [path for path, _ in engine_model.lora_layers(model)] == ["moe", "moe.base"]
    lk.set_adapter(model, "a")
    only_a = outputs(model, {"tokens": MOE_TOKENS})
    lk.set_adapter(model, ["a", "b"])
    both = outputs(model, {"tokens": MOE_TOKENS})
    assert not torch.allclose(only_a, both) and not torch.allclose(only_a, plain)
    lk.delete_adapter(model, "b")
    torch.testing.assert_close(outputs(model, {"tokens": MOE_TOKENS}), only_a)
    lk.delete_adapter(model, "a")
    assert type(model.moe) is Experts
    torch.testing.assert_close(outputs(model, {"tokens": MOE_TOKENS}), plain)


# PEFT's LoraConfig fields that lorakit reads, and those that cannot change a loaded adapter's outputs: metadata,
# runtime settings, and options that only qualify another one (which is read or refused itself)
READ_PEFT_FIELDS = {
    "task_type", "peft_type", "base_model_name_or_path", "inference_mode", "r", "target_modules", "exclude_modules",
    "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
    "rank_pattern", "alpha_pattern", "trainable_token_indices", "use_dora", "lora_bias", "target_parameters",
}  # fmt: skip
INERT_PEFT_FIELDS = {
    "auto_mapping", "peft_version", "revision", "runtime_config",  # metadata; GPU offloading while loading
    "megatron_core", "qalora_group_size", "layers_pattern",  # with megatron_config, use_qalora, layers_to_transform
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # with their init_lora_weights, refused
}  # fmt: skip


def test_every_peft_lora_option_is_read_or_refused():
    """A PEFT version with a new LoraConfig field fails here until lorakit reads it or refuses it."""
    fields = {field.name for field in dataclasses.fields(PeftLoraConfig)}
    assert fields - READ_PEFT_FIELDS - INERT_PEFT_FIELDS - set(UNSUPPORTED_PEFT_OPTIONS) == set()


@pytest.mark.parametrize("option", sorted(UNSUPPORTED_PEFT_OPTIONS))
def test_an_option_lorakit_refuses_is_named_in_one_line_and_listed_in_the_readme(option):
    value = True if UNSUPPORTED_PEFT_OPTIONS[option] is False else [1]
    with pytest.raises(ValueError) as error:
        config_from_peft({"target_modules": ["q"], option: value}, where="adapter/adapter_config.json")
    assert str(error.value) == f"adapter/adapter_config.json: {option}={value!r} is not supported by lorakit"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"`{option}`" in readme
