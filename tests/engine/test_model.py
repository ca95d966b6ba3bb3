"""The LoRA engine on plain PyTorch models (lorakit.engine.model): injection, adapters, merging, disabling,
mixed batches, trainable parameters, tied weights, and torch.compile."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, TinyNet
from torch import nn

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine.layers import LoraLayer, LoraLinear, ModuleCopies


def test_only_adapter_parameters_train_and_counts_are_r_times_in_plus_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    total_before = sum(p.numel() for p in model.parameters())
    lk.inject(model, lk.LoraConfig(r=3, alpha=3, target_modules=["0", "2"]))
    trainable, total = lk.parameter_counts(model)
    assert trainable == 3 * (64 + 100) + 3 * (100 + 10)
    assert total == total_before + trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"}


def test_disabled_gives_the_base_model_and_restores_state_even_on_error(net, tokens):
    base = net(tokens)
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False))
    adapted = net(tokens)
    with lk.disabled(net):
        assert torch.equal(net(tokens), base)
    assert torch.equal(net(tokens), adapted)
    with pytest.raises(KeyError), lk.disabled(net):
        raise KeyError("boom")
    assert torch.equal(net(tokens), adapted)


def test_merge_unmerge_round_trip_and_merged_outputs(net, tokens):
    lk.inject(net, lk.LoraConfig(r=4, target_modules=ALL, init=False))
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    unmerged = net(tokens)
    lk.merge(net)
    torch.testing.assert_close(net(tokens), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"), lk.disabled(net):
        pass
    lk.unmerge(net)
    for n, p in net.named_parameters():
        assert (p - weights[n]).abs().max().item() <= 1e-6, n


def test_merged_adapter_cannot_be_switched_off_by_activating_or_adding_another(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False), "b")
    lk.set_adapter(net, "a")
    lk.merge(net)
    merged = net(tokens)
    with pytest.raises(ValueError, match=r"\['a'\] are merged .* lk.unmerge"):
        lk.set_adapter(net, "b")
    with pytest.raises(ValueError, match="unmerge"):
        lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL), "c")
    assert lk.adapter_names(net) == ["a", "b"] and engine_model.active_adapters(net) == ["a"]
    torch.testing.assert_close(net(tokens), merged, atol=0, rtol=0)
    lk.set_adapter(net, ["a", "b"])  # keeping the merged one active is fine


def test_deleted_adapter_is_no_longer_active(net, tokens, tmp_path):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False), "a")
    lk.save_adapter(net, tmp_path / "a", adapter="a")
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False), "b")
    lk.delete_adapter(net, "b")
    assert engine_model.active_adapters(net) == []
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="shape"):  # the load's own error, not one from restoring the state
        lk.load_adapter(net, tmp_path / "a", adapter="c")


def test_bias_all_saves_a_layer_only_another_adapter_wraps_as_a_fresh_model_names_it(net, tokens, tmp_path):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["hidden"], init=False), "a")
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["out"], init=False, bias="all"), "b")
    with torch.no_grad():
        net.hidden.base.bias.add_(1.0)  # as if trained with "b"
    expected = net(tokens)
    lk.save_adapter(net, tmp_path / "b", adapter="b")
    torch.manual_seed(0)
    fresh = lk.load_adapter(TinyNet(), tmp_path / "b")
    torch.testing.assert_close(fresh(tokens), expected, atol=1e-6, rtol=1e-6)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(net):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False))
    with torch.no_grad():
        net.out.lora_B["default"][0, 0] = float("inf")
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match="out"):
        lk.merge(net, safe=True)
    for n, p in net.named_parameters():
        assert torch.equal(p, weights[n])
    assert all(not layer.merged_adapters for _, layer in engine_model.lora_layers(net))


def test_merge_and_unload_leaves_plain_torch_modules(net, tokens):
    lk.inject(net, lk.LoraConfig(r=4, target_modules=ALL, init=False, modules_to_save=None))
    expected = net(tokens)
    plain = lk.merge_and_unload(net)
    assert not any(isinstance(m, LoraLayer | ModuleCopies) for m in plain.modules())
    assert not any(type(m).__module__.startswith("lorakit") for m in plain.modules())
    torch.testing.assert_close(plain(tokens), expected, atol=1e-5, rtol=1e-5)
    assert lk.adapter_names(plain) == []


def test_unload_restores_the_original_modules_and_weights(net, tokens):
    original = copy.deepcopy(net)
    lk.inject(net, lk.LoraConfig(r=4, target_modules=ALL, init=False))
    lk.merge(net)
    lk.unload(net)
    assert [type(m) for m in net.modules()] == [type(m) for m in original.modules()]
    torch.testing.assert_close(net(tokens), original(tokens), atol=1e-6, rtol=0)


def test_delete_adapter_and_unknown_names(net, tokens):
    base = net(tokens)
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["hidden"], init=False), "b")
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; the model has: a, b"):
        lk.set_adapter(net, "c")
    lk.delete_adapter(net, "a")
    assert lk.adapter_names(net) == ["b"]
    assert isinstance(net.embed, nn.Embedding) and isinstance(net.hidden, LoraLinear)
    lk.delete_adapter(net, "b")
    assert torch.equal(net(tokens), base)
    with pytest.raises(ValueError, match="unknown adapter"):
        lk.delete_adapter(net, "b")


def test_adding_an_adapter_name_twice_is_refused(net):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL))


def assert_mixed_batch_matches_one_adapter_at_a_time(net, tokens, order: list[str], atol: float) -> None:
    mixed = lk.forward_per_sample(net, order, tokens)
    expected = {}
    for name in dict.fromkeys(n for n in order if n != lk.BASE):
        lk.set_adapter(net, name)
        expected[name] = net(tokens)
    with lk.disabled(net):
        expected[lk.BASE] = net(tokens)
    for i, name in enumerate(order):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=atol, rtol=atol)


def test_forward_per_sample_matches_one_adapter_at_a_time(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, alpha=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=5, alpha=3, target_modules=["hidden", "out", "embed"], init=False), "b")
    assert_mixed_batch_matches_one_adapter_at_a_time(net, tokens, ["b", lk.BASE, "a", "b"], atol=1e-5)
    with pytest.raises(ValueError, match="a mixed batch names 3 adapters for a batch of 4 samples"):
        lk.forward_per_sample(net, ["a", "b", "a"], tokens)
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        lk.forward_per_sample(net, ["zzz"] * 4, tokens)


def test_mixed_batches_without_gradients_follow_factors_changed_between_calls(net, tokens):
    """The stacked per-adapter factors are reused between no-grad calls: until a factor changes in place or
    the model moves to another dtype."""
    lk.inject(net, lk.LoraConfig(r=2, alpha=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=3, alpha=3, target_modules=["hidden", "out"], init=False), "b")
    order = ["a", "b", lk.BASE, "a"]

    def check(atol: float) -> None:
        with torch.no_grad():
            assert_mixed_batch_matches_one_adapter_at_a_time(net, tokens, order, atol)

    check(atol=1e-5)
    with torch.no_grad():
        for p in engine_model.adapter_parameters(net, "a").values():
            p.mul_(2.0)
    check(atol=1e-5)
    net.double()  # swaps each parameter's data for a float64 copy: same Parameter objects, same versions
    check(atol=1e-12)


def test_forward_per_sample_gradients_equal_one_sample_at_a_time(net, tokens):
    """Training through a mixed batch: each adapter gets the gradient of its own samples only."""
    lk.inject(net, lk.LoraConfig(r=2, alpha=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=3, alpha=3, target_modules=["hidden", "out"], init=False), "b")
    params = {f"{name}: {key}": p for name in "ab" for key, p in engine_model.adapter_parameters(net, name).items()}
    assert len(params) == 4 * 2 + 2 * 2
    for p in params.values():
        p.requires_grad_(True)
    order = ["a", "b", lk.BASE, "a"]
    lk.forward_per_sample(net, order, tokens).square().sum().backward()
    mixed = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    for i, name in enumerate(order):
        if name == lk.BASE:
            continue
        lk.set_adapter(net, name)
        net(tokens[i : i + 1]).square().sum().backward()
    for k, p in params.items():
        torch.testing.assert_close(mixed[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_forward_per_sample_uses_batched_matmuls_not_a_loop_per_sub_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    for name in "abc":
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], init=False), name)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as profile:
        lk.forward_per_sample(model, ["a", "b", "c", "a", lk.BASE, "b"], torch.randn(6, 3, 8))
    batched = [e for e in profile.events() if e.name in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_")]
    # x Aᵀ, then the accumulation of (x Aᵀ) Bᵀ into the base output: each over all six samples at once
    assert [e.name for e in batched] == ["aten::bmm", "aten::baddbmm_"]
    assert all(e.input_shapes[1][0] == 6 for e in batched)


def test_per_sample_routes_every_call_in_the_block_and_is_removed_after_it_even_on_error(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, alpha=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=3, alpha=3, target_modules=["hidden", "out"], init=False), "b")
    order = ["b", lk.BASE, "a", "b"]
    expected = lk.forward_per_sample(net, order, tokens)
    active = net(tokens)  # "b", the active adapter, on every sample
    with engine_model.per_sample(net, order) as routed:
        assert routed is net
        for _ in range(2):  # every call inside the block, as model.generate makes many
            torch.testing.assert_close(net(tokens), expected, atol=0, rtol=0)
    torch.testing.assert_close(net(tokens), active, atol=0, rtol=0)
    with pytest.raises(KeyError), engine_model.per_sample(net, order):
        raise KeyError("inside the block")
    assert all(m.routing is None for m in net.modules() if hasattr(m, "routing"))
    torch.testing.assert_close(net(tokens), active, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"), engine_model.per_sample(net, ["zzz"] * 4):
        pass


def test_no_match_lists_at_most_ten_module_names():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ValueError) as info:
        lk.inject(model, lk.LoraConfig(r=1, target_modules="nothing"))
    listed = str(info.value).split("the model has: ")[1]
    assert listed.count(",") == 10 and listed.endswith("…")


@pytest.mark.parametrize(
    "bias, trainable", [("none", set()), ("lora_only", {"hidden", "out"}), ("all", {"conv", "hidden", "out"})]
)
def test_bias_modes_choose_which_base_biases_train(net, bias, trainable):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["hidden", "out"], bias=bias))
    training = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert training == set(trainable)


def test_modules_to_save_trains_a_copy_and_keeps_the_original(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["hidden"], modules_to_save=["out"]))
    assert isinstance(net.out, ModuleCopies)
    original = net.out.original.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        net(tokens).square().mean().backward()
        optimizer.step()
    assert torch.equal(net.out.original.weight, original)
    assert not torch.equal(net.out.copies["default"].weight, original)
    adapted = net(tokens)
    with lk.disabled(net):
        assert not torch.allclose(net(tokens), adapted)
    keys = set(lk.lora_state_dict(net))
    assert {"base_model.model.out.weight", "base_model.model.out.bias"} <= keys


def test_training_moves_only_the_adapter_and_gradients_reach_a_and_b(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL))
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(tokens).reshape(-1, 5), torch.zeros(28, dtype=torch.long))
        loss.backward()
        optimizer.step()
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert net.hidden.lora_B["default"].abs().sum() > 0


def test_deepcopy_and_state_dict_round_trip(net, tokens):
    lk.inject(net, lk.LoraConfig(r=3, target_modules=ALL, init=False))
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(tokens), net(tokens))
    assert lk.adapter_names(twin) == ["default"]
    torch.manual_seed(5)
    other = lk.inject(TinyNet(), lk.LoraConfig(r=3, target_modules=ALL, init=False))
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other(tokens), net(tokens))


def test_bfloat16_cast_keeps_working(net, tokens):
    lk.inject(net, lk.LoraConfig(r=3, target_modules=ALL, init=False))
    expected = net(tokens)
    net.to(torch.bfloat16)
    out = net(tokens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(net, tokens):
    lk.inject(net, lk.LoraConfig(r=2, target_modules=ALL))
    eager_net = copy.deepcopy(net)

    def two_steps(model, params):
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(tokens).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    compiled = torch.compile(net)  # inductor: the real compiler, C++ kernels on CPU
    losses = two_steps(compiled, [p for p in net.parameters() if p.requires_grad])
    expected = two_steps(eager_net, [p for p in eager_net.parameters() if p.requires_grad])
    assert losses == pytest.approx(expected, rel=1e-5)
    assert net.hidden.lora_B["default"].abs().sum() > 0
    for (name, p), q in zip(net.named_parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_multihead_attention_out_proj_is_refused_by_name_and_skipped_by_all_linear():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    with pytest.raises(ValueError, match=r"self_attn.out_proj is the out_proj of an nn.MultiheadAttention"):
        lk.inject(copy.deepcopy(layer), lk.LoraConfig(r=2, target_modules=["out_proj"]))
    model = lk.inject(layer, lk.LoraConfig(r=2, target_modules="all-linear", init=False))
    assert [name for name, _ in engine_model.lora_layers(model)] == ["linear1", "linear2"]
    model(torch.randn(3, 5, 8))  # runs: MultiheadAttention still finds out_proj.weight and .bias


def test_merging_into_a_tied_embedding_is_refused_and_changes_nothing():
    from helpers import build_tiny_gpt2

    model = build_tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its head to its embedding
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["wte", "c_attn"], init=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merging in (lk.merge, lk.merge_and_unload):
        with pytest.raises(ValueError, match=r"transformer.wte.weight is tied to lm_head.weight: merging would change"):
            merging(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with lk.disabled(model):  # nothing was merged: the layers still run factored
        assert not any(layer.merged_adapters for _, layer in engine_model.lora_layers(model))


def test_an_svd_start_on_a_tied_head_is_refused_and_changes_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    model = LlamaForCausalLM(LlamaConfig(**size, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight: init='pissa' rewrites"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["lm_head"], init="pissa"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adding_or_merging_an_adapter_inside_disabled_is_refused():
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(3, 4)
    with lk.disabled(model):
        base = model(x)
        with pytest.raises(RuntimeError, match=r"cannot add an adapter inside lk.disabled\(model\)"):
            lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "1"]), "b")
        with pytest.raises(RuntimeError, match=r"cannot merge inside lk.disabled\(model\)"):
            lk.merge(model)
        torch.testing.assert_close(model(x), base)  # still the base alone
        assert lk.adapter_names(model) == ["default"]
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"]), "b")  # after the block, as usual


def test_merge_and_unload_gives_back_the_original_weight_under_an_inactive_pissa_adapter():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    original = {name: p.detach().clone() for name, p in net.state_dict().items()}
    lk.inject(net, lk.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], init="pissa"), "svd")
    lk.inject(net, lk.LoraConfig(r=2, alpha=4, target_modules=["0"], init=False), "plain")  # active, non-zero
    expected_0 = original["0.weight"] + net[0].delta_weight("plain").detach()
    plain = lk.merge_and_unload(net)
    # the residual W − s·B₀A₀ under the inactive PiSSA adapter is W again; the active adapter is folded in
    torch.testing.assert_close(plain[0].weight, expected_0, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain[2].weight, original["2.weight"], atol=1e-6, rtol=0)


def test_each_target_name_that_matches_no_module_is_warned_about_and_the_others_are_adapted(net):
    with pytest.warns(UserWarning) as caught:
        lk.inject(net, lk.LoraConfig(target_modules=["hidden", "nope_proj", "hiden"]))
    messages = [str(w.message) for w in caught]
    assert messages == [
        "target_modules name 'nope_proj' matches no module of the model",
        "target_modules name 'hiden' matches no module of the model",
    ]
    assert [path for path, _ in engine_model.lora_layers(net)] == ["hidden"]
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into lorakit
