"""Adapters that start from the weight they adapt: `LoraConfig(init="pissa" | "pissa_niter_K" | "milora" | "olora")`.

- the outputs are unchanged at init, on a tiny Llama (nn.Linear) and on GPT-2 (Conv1D, fan_in_fan_out);
- the factors are what the papers say: PiSSA the top-r singular triplets of W, MiLoRA the smallest r, OLoRA
  B = Q[:, :r] (orthonormal columns) and A = R[:r]; the base weight becomes W − s·B·A;
- after a few training steps, `save_adapter(..., convert_to_lora=True)` writes a plain LoRA of rank 2r that
  gives the fine-tuned outputs on a fresh, untouched base, in lorakit and in PEFT; without conversion the file
  names its init and both libraries re-run it on load;
- unload and delete_adapter give the original weights back; a failed load leaves the base bit-identical;
- Embedding / Conv targets and ranks above min(W.shape) are refused with a clear ValueError.
"""

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import build_tiny_gpt2, build_tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
import lorakit.engine.model
import lorakit.engine.svd_init
from lorakit.engine.layers import LoraLayer

ATOL = 1e-5
SVD_INITS = ["pissa", "pissa_niter_4", "milora", "olora"]
TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


MODELS = {"llama": (build_tiny_llama, LLAMA_TARGETS), "gpt2": (build_tiny_gpt2, GPT2_TARGETS)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def as_out_in(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """A Linear / Conv1D weight as the (out × in) matrix the factors approximate."""
    return weight.T if layer.fan_in_fan_out else weight


def finetune(model: nn.Module, steps: int = 3, lr: float = 0.01) -> None:
    """A few Adam steps on the trainable (adapter) parameters; the model stays in eval mode (no dropout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()


def adapted(model_name: str, init: str, **config) -> nn.Module:
    build, targets = MODELS[model_name]
    kwargs = {"r": 4, "alpha": 8, "target_modules": targets, "init": init, **config}
    return lk.inject(build(), lk.LoraConfig(**kwargs))


def initial_layers(model_name: str, init: str, **config) -> Iterator[tuple]:
    """For each layer of a fresh model adapted with `init`: its original weight W (out × in), A, B, s, the layer."""
    original = state(MODELS[model_name][0]())
    model = adapted(model_name, init, **config)
    for path, layer in lora_layers(model):
        W = as_out_in(layer, original[f"{path}.weight"])
        yield W, layer.lora_A["default"].detach(), layer.lora_B["default"].detach(), layer.scale["default"], layer


# -- at init ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_outputs_are_unchanged_at_init(model_name, init):
    build, _ = MODELS[model_name]
    expected = logits(build())
    model = adapted(model_name, init)
    assert lora_layers(model)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_base_weight_becomes_the_residual_w_minus_s_b_a(model_name, init):
    for W, A, B, s, layer in initial_layers(model_name, init):
        residual = as_out_in(layer, layer.base.weight.detach())
        assert B.abs().sum() > 0 and A.abs().sum() > 0  # not the usual B = 0 start
        torch.testing.assert_close(residual, W - s * B @ A, atol=1e-6, rtol=0)


def reference_svd(W: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(W.double().numpy(), full_matrices=False)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_pissa_factors_are_the_top_r_singular_triplets_of_w(model_name):
    for W, A, B, s, _ in initial_layers(model_name, "pissa", rank_pattern={"v_proj": 2, "c_fc": 2}):
        r = A.shape[0]
        U, S, Vt = reference_svd(W)
        top = torch.from_numpy((U[:, :r] * S[:r]) @ Vt[:r]).float()
        torch.testing.assert_close(s * B @ A, top, atol=1e-4, rtol=0)
        torch.testing.assert_close(s * B @ A, lk.lowrank.approx(W, r, method="exact"), atol=1e-4, rtol=0)
        # B = U_r √Σ_r / √s and A = √Σ_r V_rᵀ / √s: BᵀB = AAᵀ = Σ_r / s, diagonal
        expected_gram = torch.diag(torch.from_numpy(S[:r]).float() / s)
        torch.testing.assert_close(B.T @ B, expected_gram, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(A @ A.T, expected_gram, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_pissa_niter_factors_are_close_to_the_top_r_singular_triplets(model_name):
    """The randomized SVD (4 subspace iterations) on a flat, random-init spectrum: close, not exact."""
    for W, A, B, s, _ in initial_layers(model_name, "pissa_niter_4", rank_pattern={"v_proj": 2, "c_fc": 2}):
        r = A.shape[0]
        S = torch.linalg.svdvals(W.double())[:r]
        found = torch.linalg.svdvals((s * B @ A).double())[:r]
        torch.testing.assert_close(found, S, rtol=1e-2, atol=0)
        assert float((s * B @ A).double().square().sum() / S.square().sum()) > 0.99  # the top-r energy
        torch.testing.assert_close(B.T @ B, A @ A.T, atol=1e-4, rtol=1e-4)  # √Σ on both sides


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_milora_factors_are_the_smallest_r_singular_triplets_of_w(model_name):
    for W, A, B, s, _ in initial_layers(model_name, "milora"):
        r = A.shape[0]
        U, S, Vt = reference_svd(W)
        bottom = torch.from_numpy((U[:, -r:] * S[-r:]) @ Vt[-r:]).float()
        torch.testing.assert_close(s * B @ A, bottom, atol=1e-4, rtol=0)
        np.testing.assert_allclose(
            np.linalg.svd((s * B @ A).double().numpy(), compute_uv=False)[:r], S[-r:], rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_olora_b_is_q_with_orthonormal_columns_and_a_is_r(model_name):
    for W, A, B, _, _ in initial_layers(model_name, "olora"):
        r = A.shape[0]
        torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
        Q, R = np.linalg.qr(W.double().numpy())
        # QR is unique up to the signs of Q's columns (and R's rows); fix them by R's diagonal
        signs = np.sign(np.diag(R))[:r]
        ours = np.sign(np.diag(A.double().numpy()[:, :r]))
        np.testing.assert_allclose(B.double().numpy() * ours, Q[:, :r] * signs, atol=1e-5)
        np.testing.assert_allclose(A.double().numpy() * ours[:, None], R[:r] * signs[:, None], atol=1e-5)
        assert np.allclose(np.tril(A.double().numpy()[:, :r], -1), 0)  # R[:r] is upper trapezoidal


# -- after training: saving, converting, loading ------------------------------------------------------------


def finetuned(model_name: str, init: str, **config) -> tuple[nn.Module, torch.Tensor]:
    model = adapted(model_name, init, **config)
    at_init = logits(model)
    finetune(model)
    tuned = logits(model)
    assert not torch.allclose(tuned, at_init, atol=1e-3)  # the training steps changed the outputs
    return model, tuned


CONVERT_CASES = [
    ("llama", "pissa", False),
    ("llama", "pissa_niter_4", False),
    ("llama", "milora", False),
    ("llama", "olora", False),
    ("llama", "pissa", True),
    ("gpt2", "pissa", False),
    ("gpt2", "olora", False),
]


@pytest.mark.parametrize("model_name, init, use_rslora", CONVERT_CASES)
def test_converted_adapter_reproduces_the_finetuned_model_on_a_fresh_base(model_name, init, use_rslora, tmp_path):
    patterns = {
        "llama": ({"v_proj": 2}, {"o_proj": 4}),
        "gpt2": ({"c_fc": 2}, {"c_attn": 4}),
    }[model_name]
    model, tuned = finetuned(
        model_name, init, use_rslora=use_rslora, rank_pattern=patterns[0], alpha_pattern=patterns[1]
    )
    lk.save_adapter(model, tmp_path / "lora", convert_to_lora=True)

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    factor = math.sqrt(2) if use_rslora else 2
    assert config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(8 * factor)
    assert config["rank_pattern"] == {key: 2 * value for key, value in patterns[0].items()}
    assert config["alpha_pattern"] == pytest.approx({key: value * factor for key, value in patterns[1].items()})
    assert config["init_lora_weights"] is True
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for path, layer in lora_layers(model):
        r = layer.rank("default")
        assert tensors[f"base_model.model.{path}.lora_A.weight"].shape[0] == 2 * r
        assert tensors[f"base_model.model.{path}.lora_B.weight"].shape[1] == 2 * r

    build, _ = MODELS[model_name]
    fresh = build()
    untouched = state(fresh)
    lk.load_adapter(fresh, tmp_path / "lora")
    torch.testing.assert_close(logits(fresh), tuned, atol=ATOL, rtol=ATOL)
    # a plain LoRA: the base weights were not rewritten on load
    for path, layer in lora_layers(fresh):
        assert torch.equal(layer.base.weight, untouched[f"{path}.weight"])

    peft_model = PeftModel.from_pretrained(build(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), tuned, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(
    "model_name, init, in_peft",
    [("llama", "pissa", True), ("llama", "olora", True), ("gpt2", "pissa", True), ("llama", "milora", False)],
)
def test_unconverted_file_names_its_init_and_reloads_with_the_finetuned_outputs(model_name, init, in_peft, tmp_path):
    model, tuned = finetuned(model_name, init)
    lk.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == init
    assert config["r"] == 4

    build, _ = MODELS[model_name]
    fresh = lk.load_adapter(build(), tmp_path / "adapter")  # re-runs the init on the original weight
    torch.testing.assert_close(logits(fresh), tuned, atol=ATOL, rtol=ATOL)
    if in_peft:  # PEFT re-runs its own PiSSA / OLoRA init, then loads the factors
        peft_model = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
        torch.testing.assert_close(logits(peft_model), tuned, atol=ATOL, rtol=ATOL)


# -- taking it back out -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unload", "merge-then-unload", "delete_adapter"])
@pytest.mark.parametrize("init", SVD_INITS)
def test_removing_the_adapter_restores_the_original_weights(init, how):
    original = state(build_tiny_llama())
    model, _ = finetuned("llama", init)
    if how == "unload":
        lk.unload(model)
    elif how == "merge-then-unload":
        lk.merge(model)
        lk.unload(model)
    else:
        lk.delete_adapter(model, "default")
    assert not lora_layers(model)
    restored = state(model)
    assert restored.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(model), logits(build_tiny_llama()), atol=ATOL, rtol=ATOL)


def edit_first_factor(directory, rows: int) -> None:
    """Rewrites the adapter file with the first lora_A truncated or padded to `rows` rows."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(rows, tensors[key].shape[1])
    save_file(tensors, path)


def edit_config(directory, **fields) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: edit_first_factor(d, rows=3), "shape mismatch"),
        (lambda d: edit_first_factor(d, rows=5), "shape mismatch"),
        # a rank the narrowest layers (k_proj, v_proj: 16 × 32) cannot take, and the file's factors do not have:
        # refused from the file's header, before any factor is made or weight rewritten
        (lambda d: edit_config(d, r=20, lora_alpha=40), "shape mismatch"),
    ],
    ids=["fewer-rows", "more-rows", "rank-too-large"],
)
def test_failed_load_of_a_pissa_file_leaves_the_base_weights_bit_identical(break_it, message, tmp_path):
    model, _ = finetuned("llama", "pissa", target_modules=["q_proj", "k_proj", "v_proj"])
    lk.save_adapter(model, tmp_path / "adapter")
    break_it(tmp_path / "adapter")
    fresh = build_tiny_llama()
    before = state(fresh)
    names_before = [name for name, _ in fresh.named_modules()]
    with pytest.raises(ValueError, match=message):
        lk.load_adapter(fresh, tmp_path / "adapter")
    assert [name for name, _ in fresh.named_modules()] == names_before
    assert not lora_layers(fresh)
    assert lk.adapter_names(fresh) == []
    after = state(fresh)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


# -- refused up front ---------------------------------------------------------------------------------------


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(12, 12)  # comes first: a valid target that must not be touched either
        self.embed = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 12, kernel_size=3, padding=1)


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("target", ["embed", "conv"])
def test_svd_init_on_an_embedding_or_conv_target_raises_before_changing_anything(init, target):
    torch.manual_seed(0)
    model = MixedNet()
    before = state(model)
    with pytest.raises(ValueError, match=rf"init='{init}'.*{target}"):
        lk.inject(model, lk.LoraConfig(r=2, alpha=2, target_modules=["hidden", target], init=init))
    assert not lora_layers(model)
    assert lk.adapter_names(model) == []
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("init", SVD_INITS)
def test_rank_larger_than_the_weight_raises(init):
    model = build_tiny_llama()
    with pytest.raises(ValueError, match=r"r <= min\(32, 32\).*r=33"):
        lk.inject(model, lk.LoraConfig(r=33, alpha=33, target_modules=["q_proj"], init=init))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_larger_than_one_weight_raises_before_changing_anything(init):
    """q_proj (32 × 32) could take r=20, k_proj (16 × 32) cannot: q_proj must not be left rewritten."""
    model = build_tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"r <= min\(16, 32\)"):
        lk.inject(model, lk.LoraConfig(r=20, alpha=20, target_modules=["q_proj", "k_proj"], init=init))
    assert not lora_layers(model)
    assert lk.adapter_names(model) == []
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("init", SVD_INITS)
def test_each_layer_is_checked_once_under_its_module_path(init, monkeypatch):
    """inject checks every layer before rewriting the first; initialising one must not check it again under
    another name (the base module's class), which a refusal would then print instead of the layer's path."""
    check, checked = lorakit.engine.svd_init.check_svd_init, []

    def recording(layer, path, *args):
        checked.append(path)
        check(layer, path, *args)

    monkeypatch.setattr(lorakit.engine.model, "check_svd_init", recording)
    monkeypatch.setattr(lorakit.engine.svd_init, "check_svd_init", recording)
    model = lk.inject(build_tiny_llama(), lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init=init))
    assert sorted(checked) == sorted(name for name, _ in lora_layers(model))


def test_saving_a_randomized_start_unconverted_warns_that_peft_will_not_reproduce_it(tmp_path, recwarn):
    model = adapted("llama", "pissa_niter_4")
    with pytest.warns(UserWarning, match=r"randomized SVD \(pissa_niter_4\).*convert_to_lora=True"):
        lk.save_adapter(model, tmp_path / "plain")
    recwarn.clear()
    lk.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    lk.save_adapter(adapted("llama", "pissa"), tmp_path / "exact")  # the exact SVD: every loader gets the same
    assert not [w for w in recwarn if "randomized SVD" in str(w.message)]
