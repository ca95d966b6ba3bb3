"""SVD tools on stored adapters: `lk.extract`, `lk.resize`, `lk.combine`, `lk.inspect`, `lk.compare` and their commands.

- extraction of a planted rank-k delta recovers it to float precision, picks rank k per layer from an energy
  fraction, skips unchanged layers and honours `targets`; the adapter loads in PEFT and in lorakit with the
  tuned model's logits, from state dicts, model directories (sharded too), single .safetensors files, GPT-2's
  Conv1D and an Embedding;
- resize is `lowrank.approx` of the full ΔW, reports the energy it keeps, and never forms out × in (a
  200 000 × 200 000 layer resizes in moments);
- combine: "cat" is exact, "svd" the best rank-r fit with its error reported, "linear" only for equal ranks;
- inspect and compare agree with the full matrices, and write PNG plots;
- bad input ends in one `lorakit: error: ...` line and exit code 2, with nothing written.
"""

import json
import math
import re
import resource

import numpy as np
import pytest
import torch
from conftest import build_tiny_gpt2, build_tiny_llama, cli_error, run_cli
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.engine.peft_format import config_from_peft

TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PREFIX = "base_model.model."

# planted rank per weight of the tiny Llama: (out × in) 32 × 32, 16 × 32, 32 × 64, 64 × 32
PLANTED = {
    "model.layers.0.self_attn.q_proj.weight": 2,
    "model.layers.0.self_attn.v_proj.weight": 3,
    "model.layers.1.mlp.down_proj.weight": 5,
    "model.layers.1.mlp.gate_proj.weight": 1,
}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def base_state(build=build_tiny_llama) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in build().state_dict().items()}


def plant(base: dict[str, torch.Tensor], ranks: dict[str, int], seed: int = 0):
    """A "fine-tuned" state dict: W + B A of rank k added to each named weight; returns it and the deltas."""
    g = torch.Generator().manual_seed(seed)
    tuned, deltas = dict(base), {}
    for key, k in ranks.items():
        rows, cols = base[key].shape
        delta = (torch.randn(rows, k, generator=g, dtype=torch.float64) * 0.1) @ (
            torch.randn(k, cols, generator=g, dtype=torch.float64) * 0.1
        )
        tuned[key] = (base[key].double() + delta).to(base[key].dtype)
        deltas[key] = tuned[key].double() - base[key].double()  # what actually changed, after rounding
    return tuned, deltas


def tuned_model(tuned: dict[str, torch.Tensor], build=build_tiny_llama) -> nn.Module:
    model = build()
    model.load_state_dict(tuned, strict=False)
    return model


def layer_deltas(state: lk.AdapterState) -> dict[str, torch.Tensor]:
    """Each layer's ΔW = s·B·A (out × in) in float64, the scale resolved from the adapter's own config."""
    config = config_from_peft(state.config)
    out = {}
    for key, A in state.tensors.items():
        for a_suffix, b_suffix in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith("." + a_suffix):
                path = key[len(PREFIX) : -len(a_suffix) - 1]
                B = state.tensors[key[: -len(a_suffix)] + b_suffix]
                r = A.shape[0]
                alpha = config.alpha_for(path)
                s = alpha / math.sqrt(r) if config.use_rslora else alpha / r
                out[path] = s * B.double() @ A.double()
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def assert_loads_with_logits(adapter_dir, build, expected, atol=1e-4) -> None:
    """The adapter, on a fresh base, gives `expected` in PEFT and in lorakit."""
    peft_model = PeftModel.from_pretrained(build(), adapter_dir).eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=atol, rtol=0)
    model = lk.load_adapter(build(), adapter_dir)
    torch.testing.assert_close(logits(model), expected, atol=atol, rtol=0)


# -- extraction --------------------------------------------------------------------------------------------


def test_extract_recovers_a_planted_rank_k_delta_to_float_precision():
    base = base_state()
    tuned, deltas = plant(base, PLANTED)
    state = lk.extract(base, tuned, r=max(PLANTED.values()))
    report = state.report["layers"]
    assert set(report) == {key.removesuffix(".weight") for key in PLANTED}
    found = layer_deltas(state)
    for key in PLANTED:
        path = key.removesuffix(".weight")
        assert report[path]["relative_error"] < 1e-5
        assert report[path]["rank"] == 5
        assert report[path]["shape"] == list(base[key].shape)
        assert report[path]["energy_kept"] == pytest.approx(1.0, abs=1e-9)
        assert relative(found[path], deltas[key]) < 1e-5


def test_extract_with_an_energy_fraction_picks_exactly_the_planted_rank_per_layer():
    base = base_state()
    tuned, deltas = plant(base, PLANTED)
    state = lk.extract(base, tuned, energy=0.999999)
    found = layer_deltas(state)
    for key, k in PLANTED.items():
        path = key.removesuffix(".weight")
        assert state.report["layers"][path]["rank"] == k
        assert state.tensors[f"{PREFIX}{path}.lora_A.weight"].shape[0] == k
        assert state.report["layers"][path]["relative_error"] < 1e-5
        assert relative(found[path], deltas[key]) < 1e-5


def test_extract_skips_unchanged_layers_and_keeps_only_the_targets():
    base = base_state()
    tuned, _ = plant(base, PLANTED)
    state = lk.extract(base, tuned, r=1)
    assert state.report["unchanged"] == len(base) - len(PLANTED)
    assert set(state.report["layers"]) == {key.removesuffix(".weight") for key in PLANTED}
    assert len(state.tensors) == 2 * len(PLANTED)

    only_q = lk.extract(base, tuned, r=2, targets=["q_proj"])
    assert set(only_q.report["layers"]) == {"model.layers.0.self_attn.q_proj"}
    assert set(only_q.tensors) == {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight",
    }
    assert sorted(only_q.report["other_changed"]) == sorted(k for k in PLANTED if "q_proj" not in k)

    layer_1 = lk.extract(base, tuned, r=1, targets=r".*\.layers\.1\..*")  # a regex, as in LoraConfig
    assert set(layer_1.report["layers"]) == {"model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"}


@pytest.mark.parametrize("how", ["rank", "energy"])
def test_extracted_adapter_loads_in_peft_and_lorakit_with_the_tuned_logits(how, tmp_path):
    base = base_state()
    tuned, _ = plant(base, PLANTED)
    expected = logits(tuned_model(tuned))
    assert not torch.allclose(expected, logits(build_tiny_llama()), atol=1e-3)
    state = lk.extract(base, tuned, **({"r": 5} if how == "rank" else {"energy": 0.999999}))
    state.save(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "report.json").read_text())["layers"]
    assert_loads_with_logits(tmp_path / "adapter", build_tiny_llama, expected)


def save_llama(directory, state: dict[str, torch.Tensor], layout: str):
    """The model in one of the forms BASE / TUNED take: a directory (one file or shards) or a .safetensors file."""
    if layout == "file":
        path = directory.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        return path
    model = tuned_model(state)
    if layout == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    else:
        model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("layout", ["directory", "sharded", "file"])
def test_cli_extract_from_model_directories_shards_and_files_loads_with_the_tuned_logits(layout, tmp_path, capsys):
    base = base_state()
    tuned, _ = plant(base, PLANTED)
    expected = logits(tuned_model(tuned))
    base_path = save_llama(tmp_path / "base", base, layout)
    tuned_path = save_llama(tmp_path / "tuned", tuned, layout)
    code, out, err = run_cli(capsys, "extract", base_path, tuned_path, "--energy", "0.999999", "--out", tmp_path / "ad")
    assert code == 0, err
    assert "q_proj" in out
    report = json.loads((tmp_path / "ad" / "report.json").read_text())
    assert {path: row["rank"] for path, row in report["layers"].items()} == {
        key.removesuffix(".weight"): k for key, k in PLANTED.items()
    }
    assert all(row["relative_error"] < 1e-5 for row in report["layers"].values())
    assert_loads_with_logits(tmp_path / "ad", build_tiny_llama, expected)


def test_cli_extract_round_trips_an_embedding_weight_change(tmp_path, capsys):
    base = base_state()
    tuned, deltas = plant(base, {"model.embed_tokens.weight": 2, "model.layers.0.self_attn.q_proj.weight": 3})
    expected = logits(tuned_model(tuned))
    save_llama(tmp_path / "base", base, "directory")
    save_llama(tmp_path / "tuned", tuned, "directory")
    code, _, err = run_cli(
        capsys, "extract", tmp_path / "base", tmp_path / "tuned", "--rank", "3", "--out", tmp_path / "ad"
    )
    assert code == 0, err
    state = lk.AdapterState.load(tmp_path / "ad")
    # an Embedding's factors under PEFT's embedding keys: A (r × num_embeddings), B (dim × r)
    assert state.tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (3, 100)
    assert state.tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (32, 3)
    embedding_delta = layer_deltas(state)["model.embed_tokens"]  # (dim × vocab): the update of Wᵀ
    assert relative(embedding_delta.T, deltas["model.embed_tokens.weight"]) < 1e-5
    assert_loads_with_logits(tmp_path / "ad", build_tiny_llama, expected)


@pytest.mark.parametrize("base_as", ["directory", "file"])
def test_cli_extract_round_trips_gpt2_conv1d_and_position_embedding_changes(tmp_path, capsys, base_as):
    """Layer kinds come from whichever of BASE and TUNED is a model directory."""
    base = base_state(build_tiny_gpt2)
    planted = {
        "transformer.h.0.attn.c_attn.weight": 2,  # Conv1D, stored (in × out) = 32 × 96
        "transformer.h.1.mlp.c_proj.weight": 3,  # Conv1D, 128 × 32
        "transformer.wpe.weight": 2,  # Embedding (not tied to the head, unlike wte)
    }
    tuned, deltas = plant(base, planted)
    expected = logits(tuned_model(tuned, build_tiny_gpt2))
    tuned_model(base, build_tiny_gpt2).save_pretrained(tmp_path / "base")
    tuned_model(tuned, build_tiny_gpt2).save_pretrained(tmp_path / "tuned")
    base_path = tmp_path / "base" if base_as == "directory" else tmp_path / "base" / "model.safetensors"
    code, _, err = run_cli(capsys, "extract", base_path, tmp_path / "tuned", "--rank", "3", "--out", tmp_path / "ad")
    assert code == 0, err
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    state = lk.AdapterState.load(tmp_path / "ad")
    # a Conv1D's update is (out × in): A (r × 32), B (96 × r) for c_attn
    assert state.tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight"].shape == (3, 32)
    assert state.tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 3)
    found = layer_deltas(state)
    for key in planted:
        assert relative(found[key.removesuffix(".weight")].T, deltas[key]) < 1e-5
    assert_loads_with_logits(tmp_path / "ad", build_tiny_gpt2, expected)


def test_cli_extract_warns_that_a_tied_embedding_changes_the_lookup_alone(tmp_path, capsys):
    base = base_state(build_tiny_gpt2)
    tuned, _ = plant(base, {"transformer.wte.weight": 2, "transformer.h.0.attn.c_attn.weight": 2})
    tuned["lm_head.weight"] = tuned["transformer.wte.weight"]  # one tensor under two names: load either
    tuned_model(base, build_tiny_gpt2).save_pretrained(tmp_path / "base")
    tuned_model(tuned, build_tiny_gpt2).save_pretrained(tmp_path / "tuned")
    code, _, err = run_cli(
        capsys, "extract", tmp_path / "base", tmp_path / "tuned", "--rank", "2", "--out", tmp_path / "ad"
    )
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: transformer.wte shares its weight with the model's output head (tied embeddings): an adapter "
        "changes the lookup alone, so the adapted model's outputs will differ from TUNED's"
    ]


# -- adapters by hand --------------------------------------------------------------------------------------


def random_factors(out: int, inp: int, r: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype)


def adapter(factors: dict, alpha: float = 8.0, use_rslora: bool = False, alphas: dict | None = None) -> lk.AdapterState:
    """An AdapterState from {path: (A, B)}: rank from the factors, α from `alphas` or `alpha`."""
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    r = max(ranks.values())
    tensors = {}
    for path, (A, B) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(factors),
        "rank_pattern": {re.escape(path): k for path, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(path): a for path, a in (alphas or {}).items()},
        "use_rslora": use_rslora,
        "init_lora_weights": True,
    }
    return lk.AdapterState(config, tensors)


def full(A: torch.Tensor, B: torch.Tensor, alpha: float, use_rslora: bool = False) -> torch.Tensor:
    r = A.shape[0]
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    return s * B.double() @ A.double()


SMALL = {"a.q": (40, 30, 6), "a.v": (20, 50, 5), "b.o": (30, 30, 4)}  # path: (out, in, r)


def small_adapter(use_rslora: bool = False, dtype=torch.float32) -> tuple[lk.AdapterState, dict[str, torch.Tensor]]:
    factors = {path: random_factors(o, i, r, seed) for seed, (path, (o, i, r)) in enumerate(SMALL.items())}
    factors = {path: (A.to(dtype), B.to(dtype)) for path, (A, B) in factors.items()}
    alphas = {"a.v": 3.0}
    state = adapter(factors, alpha=12.0, use_rslora=use_rslora, alphas=alphas)
    deltas = {path: full(A, B, alphas.get(path, 12.0), use_rslora) for path, (A, B) in factors.items()}
    return state, deltas


# -- resize ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_resize_equals_lowrank_approx_of_the_full_delta(use_rslora):
    state, deltas = small_adapter(use_rslora)
    resized = lk.resize(state, r=3)
    found = layer_deltas(resized)
    for path, delta in deltas.items():
        best = lk.lowrank.approx(delta, 3, method="exact")
        torch.testing.assert_close(found[path], best, atol=1e-5, rtol=1e-5)
        S = torch.linalg.svdvals(delta)
        row = resized.report["layers"][path]
        assert (row["rank_before"], row["rank"]) == (SMALL[path][2], 3)
        kept = float(S[:3].square().sum() / S.square().sum())
        assert row["energy_kept"] == pytest.approx(kept, rel=1e-9)
        assert row["relative_error"] == pytest.approx(relative(best, delta), rel=1e-6)
        assert row["relative_error"] == pytest.approx(math.sqrt(1 - kept), rel=1e-6)


def test_resize_by_energy_keeps_the_rank_lowrank_picks_and_reads_a_directory(tmp_path):
    state, deltas = small_adapter()
    state.save(tmp_path / "adapter")
    resized = lk.resize(str(tmp_path / "adapter"), energy=0.8)
    found = layer_deltas(resized)
    for path, delta in deltas.items():
        k = lk.lowrank.rank_for_energy(delta, 0.8)
        assert 1 <= k < SMALL[path][2]
        assert resized.report["layers"][path]["rank"] == k
        assert resized.report["layers"][path]["energy_kept"] >= 0.8
        torch.testing.assert_close(found[path], lk.lowrank.approx(delta, k, method="exact"), atol=1e-5, rtol=1e-5)
    resized.save(tmp_path / "small")
    assert layer_deltas(lk.AdapterState.load(tmp_path / "small")).keys() == deltas.keys()


def test_resize_refuses_a_rank_above_the_adapters():
    state, _ = small_adapter()
    with pytest.raises(ValueError, match="larger than"):
        lk.resize(state, r=6)  # b.o has rank 4


def test_factored_svd_of_a_rank_above_the_layer_is_thin_and_matches_numpy():
    A, B = random_factors(8, 40, 16, seed=5, dtype=torch.float64)  # r = 16 > out = 8
    U, S, Vh = lk.lowrank.factored_svd(B, A, 0.5)
    assert (U.shape, S.shape, Vh.shape) == ((8, 8), (8,), (8, 40))
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(0.5 * B.numpy() @ A.numpy(), compute_uv=False), rtol=1e-12)
    torch.testing.assert_close((U * S) @ Vh, 0.5 * B @ A, atol=1e-12, rtol=0)


def test_resize_of_an_adapter_whose_rank_exceeds_the_layer_caps_at_min_out_in():
    """r = 16 on an 8 × 40 layer: ΔW has rank at most 8, so 12 is refused by name and 6 is the best fit."""
    A, B = random_factors(8, 40, 16, seed=5)
    state = adapter({"narrow": (A, B)}, alpha=16.0)
    with pytest.raises(ValueError, match=re.escape("rank 12 is larger than layer narrow (8 × 40, rank 16) allows")):
        lk.resize(state, r=12)
    found = layer_deltas(lk.resize(state, r=6))["narrow"]
    torch.testing.assert_close(found, lk.lowrank.approx(full(A, B, 16.0), 6), atol=1e-5, rtol=1e-5)
    assert lk.resize(state, energy=1.0).report["layers"]["narrow"]["rank"] == 8


def gram_singular_values(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The singular values of s·B·A from r × r products: σ² are the eigenvalues of s²(BᵀB)(AAᵀ)."""
    A, B = A.double(), B.double()
    eig = torch.linalg.eigvals(s * s * (B.T @ B) @ (A @ A.T)).real.clamp(min=0)
    return eig.sqrt().sort(descending=True).values


def test_resize_never_forms_out_by_in_for_a_huge_layer():
    n, r = 200_000, 8  # ΔW would be 200 000 × 200 000 floats: 160 GB
    A, B = random_factors(n, n, r, seed=0)
    state = adapter({"huge": (A, B)}, alpha=16.0)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    resized = lk.resize(state, r=2)  # forming ΔW would fail outright: 160 GB on a 24 GB machine
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 1_000_000  # under 1 GB more at the peak
    A2 = resized.tensors[f"{PREFIX}huge.lora_A.weight"]
    B2 = resized.tensors[f"{PREFIX}huge.lora_B.weight"]
    assert A2.shape == (2, n) and B2.shape == (n, 2)
    s2 = resized.config["alpha_pattern"].get("huge", resized.config["lora_alpha"]) / 2
    # its singular values are the top two of the original, and it is the orthogonal projection onto them:
    # ⟨ΔW₂, ΔW⟩_F = ‖ΔW₂‖²_F, all from r × r products
    S = gram_singular_values(A, B, 16.0 / r)
    torch.testing.assert_close(gram_singular_values(A2, B2, s2), S[:2], rtol=1e-4, atol=0)
    cross = float((((s2 * B2.double()).T @ ((16.0 / r) * B.double())) * (A2.double() @ A.double().T)).sum())
    assert cross == pytest.approx(float(S[:2].square().sum()), rel=1e-4)


# -- combine -----------------------------------------------------------------------------------------------


def two_adapters(dtype=torch.float64, second_shapes=None):
    """a.q in both (ranks 3 and 5), a.v only in the first, b.o only in the second; different α and rsLoRA."""
    shapes = {"a.q": (40, 30, 5), "b.o": (30, 30, 2), **(second_shapes or {})}
    f1 = {"a.q": random_factors(40, 30, 3, 1, dtype), "a.v": random_factors(20, 50, 2, 2, dtype)}
    f2 = {path: random_factors(o, i, r, 10 + n, dtype) for n, (path, (o, i, r)) in enumerate(shapes.items())}
    one, two = adapter(f1, alpha=6.0), adapter(f2, alpha=4.0, use_rslora=True)
    d1 = {path: full(A, B, 6.0) for path, (A, B) in f1.items()}
    d2 = {path: full(A, B, 4.0, use_rslora=True) for path, (A, B) in f2.items()}
    return one, two, d1, d2


def weighted_sum(d1, d2, w1, w2) -> dict[str, torch.Tensor]:
    paths = list(dict.fromkeys([*d1, *d2]))
    return {p: w1 * d1.get(p, 0) + w2 * d2.get(p, 0) for p in paths}


def test_combine_cat_is_exact():
    one, two, d1, d2 = two_adapters()
    combined = lk.combine([one, two], [0.7, -1.3], method="cat")
    found = layer_deltas(combined)
    expected = weighted_sum(d1, d2, 0.7, -1.3)
    assert found.keys() == expected.keys()
    for path, delta in expected.items():
        torch.testing.assert_close(found[path], delta, atol=1e-10, rtol=1e-10)
        assert combined.report["layers"][path]["relative_error"] == 0.0
    assert combined.tensors[f"{PREFIX}a.q.lora_A.weight"].shape[0] == 3 + 5  # rank = sum of ranks


@pytest.mark.parametrize("r", [None, 4])
def test_combine_svd_is_the_best_rank_r_fit_with_its_error_reported(r):
    one, two, d1, d2 = two_adapters()
    combined = lk.combine([one, two], [0.7, -1.3], method="svd", r=r)
    found = layer_deltas(combined)
    largest_input_rank = {"a.q": 5, "a.v": 2, "b.o": 2}
    for path, delta in weighted_sum(d1, d2, 0.7, -1.3).items():
        k = min(r or largest_input_rank[path], lk.lowrank.rank(delta))
        best = lk.lowrank.approx(delta, k, method="exact")
        torch.testing.assert_close(found[path], best, atol=1e-8, rtol=1e-8)
        assert combined.report["layers"][path]["rank"] == k
        assert combined.report["layers"][path]["relative_error"] == pytest.approx(relative(best, delta), abs=1e-8)
    assert combined.report["layers"]["a.q"]["relative_error"] > 0.01  # rank 8 squeezed into 4 or 5


def test_combine_linear_refuses_unequal_ranks_and_reports_its_error_for_equal_ones():
    one, two, _, _ = two_adapters()
    with pytest.raises(ValueError, match="equal ranks"):
        lk.combine([one, two], method="linear")
    f1 = {"a.q": random_factors(40, 30, 3, 1, torch.float64)}
    f2 = {"a.q": random_factors(40, 30, 3, 2, torch.float64)}
    combined = lk.combine([adapter(f1, alpha=6.0), adapter(f2, alpha=6.0)], [0.5, 2.0], method="linear")
    exact = 0.5 * full(*f1["a.q"], 6.0) + 2.0 * full(*f2["a.q"], 6.0)
    error = relative(layer_deltas(combined)["a.q"], exact)
    assert combined.report["layers"]["a.q"]["relative_error"] == pytest.approx(error, rel=1e-6)


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_refuses_mismatched_layer_shapes(method):
    one, two, _, _ = two_adapters(second_shapes={"a.q": (40, 31, 3)})
    with pytest.raises(ValueError, match="different shapes"):
        lk.combine([one, two], method=method)


def test_cli_combine_cat_writes_the_exact_weighted_sum(tmp_path, capsys):
    one, two, d1, d2 = two_adapters(dtype=torch.float32)
    one.save(tmp_path / "one")
    two.save(tmp_path / "two")
    argv = ["combine", tmp_path / "one", tmp_path / "two", "--method", "cat", "--weights", "0.7", "-1.3"]
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "mix")
    assert code == 0, err
    assert "a.q" in out
    found = layer_deltas(lk.AdapterState.load(tmp_path / "mix"))
    for path, delta in weighted_sum(d1, d2, 0.7, -1.3).items():
        torch.testing.assert_close(found[path], delta, atol=1e-4, rtol=1e-5)


# -- inspect and compare -----------------------------------------------------------------------------------


def deficient_adapter() -> tuple[lk.AdapterState, dict[str, torch.Tensor]]:
    """Two layers of r = 4: one of full rank 4, one whose B repeats two columns (true rank 2)."""
    A1, B1 = random_factors(40, 30, 4, 1)
    A2, B2 = random_factors(20, 50, 4, 2)
    B2[:, 2:] = B2[:, :2]
    state = adapter({"full": (A1, B1), "deficient": (A2, B2)}, alpha=8.0)
    return state, {"full": full(A1, B1, 8.0), "deficient": full(A2, B2, 8.0)}


def test_inspect_matches_the_spectrum_rank_and_effective_rank_of_the_full_delta():
    state, deltas = deficient_adapter()
    rows = {row["layer"]: row for row in lk.inspect(state)}
    assert rows.keys() == deltas.keys()
    for path, delta in deltas.items():
        row = rows[path]
        S = torch.linalg.svdvals(delta)
        assert (row["r"], row["alpha"], row["scale"]) == (4, 8.0, 2.0)
        assert row["shape"] == list(delta.shape)
        found = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(found, S[: found.numel()], atol=1e-9 * float(S[0]), rtol=1e-9)
        assert row["rank"] == lk.lowrank.rank(delta)
        assert row["effective_rank"] == pytest.approx(lk.lowrank.effective_rank(delta), rel=1e-6)
        torch.testing.assert_close(
            torch.tensor(row["energy"], dtype=torch.float64),
            lk.lowrank.energy(delta)[: found.numel()],
            atol=1e-9,
            rtol=0,
        )
    assert rows["full"]["rank"] == 4 and rows["deficient"]["rank"] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inspect_finds_the_rank_of_a_half_precision_adapter_above_its_storage_round_off(dtype):
    """PEFT saves factors in the model's dtype. Three 64 × 512 layers of r = 16: B of rank 3 before rounding
    (rounding makes it full rank, at round-off level), random factors (rank 16), B with repeated columns (8)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    repeated = randn(64, 16)
    repeated[:, 8:] = repeated[:, :8]
    factors = {
        "planted": (randn(16, 512), randn(64, 3) @ randn(3, 16)),
        "random": (randn(16, 512), randn(64, 16)),
        "repeated": (randn(16, 512), repeated),
    }
    state = adapter({path: (A.to(dtype), B.to(dtype)) for path, (A, B) in factors.items()}, alpha=16.0)
    rows = {row["layer"]: row for row in lk.inspect(state)}
    assert {path: row["rank"] for path, row in rows.items()} == {"planted": 3, "random": 16, "repeated": 8}
    for path, row in rows.items():  # the spectrum is that of the stored factors, computed in float64
        A, B = (t.to(dtype).double().numpy() for t in factors[path])
        S = np.linalg.svd(B @ A, compute_uv=False)[:16]
        np.testing.assert_allclose(row["singular_values"], S, rtol=1e-9, atol=1e-12 * S[0])


def test_compare_runs_one_svd_per_adapter_and_layer_and_keeps_the_pairwise_phi(monkeypatch):
    f1 = {"a.q": random_factors(40, 30, 6, 1, torch.float64), "a.v": random_factors(20, 50, 4, 2, torch.float64)}
    f2 = {"a.q": random_factors(40, 30, 5, 3, torch.float64), "a.v": random_factors(20, 50, 3, 4, torch.float64)}
    svd, calls = torch.linalg.svd, []
    monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: calls.append(1) or svd(*args, **kwargs))
    rows = {row["layer"]: row for row in lk.compare(adapter(f1), adapter(f2))}
    assert len(calls) == 2 * 2  # two layers, one SVD of each adapter's A: not 2 · r₁ · r₂ per layer
    for path, row in rows.items():  # the pairwise definition, in numpy
        V1, V2 = (np.linalg.svd(f[path][0].numpy())[2] for f in (f1, f2))
        expected = [
            [np.linalg.norm(V1[:i] @ V2[:j].T) ** 2 / min(i, j) for j in range(1, row["r2"] + 1)]
            for i in range(1, row["r1"] + 1)
        ]
        np.testing.assert_allclose(row["phi"], expected, rtol=1e-9, atol=1e-12)


def test_compare_phi_comes_from_subspace_similarity_of_the_a_matrices_and_cosine_from_the_deltas():
    f1 = {"a.q": random_factors(40, 30, 4, 1), "a.v": random_factors(20, 50, 2, 2)}
    f2 = {"a.q": random_factors(40, 30, 3, 3), "b.o": random_factors(30, 30, 2, 4)}
    one, two = adapter(f1, alpha=8.0), adapter(f2, alpha=3.0)
    rows = list(lk.compare(one, two))
    assert [row["layer"] for row in rows] == ["a.q"]  # the one layer they share
    row = rows[0]
    (A1, B1), (A2, B2) = f1["a.q"], f2["a.q"]
    assert (row["r1"], row["r2"]) == (4, 3)
    expected_phi = [[lk.lowrank.subspace_similarity(A1, A2, i, j) for j in range(1, 4)] for i in range(1, 5)]
    torch.testing.assert_close(torch.tensor(row["phi"]), torch.tensor(expected_phi), atol=1e-6, rtol=0)
    d1, d2 = full(A1, B1, 8.0), full(A2, B2, 3.0)
    cosine = float((d1 * d2).sum() / (torch.linalg.matrix_norm(d1) * torch.linalg.matrix_norm(d2)))
    assert row["cosine"] == pytest.approx(cosine, abs=1e-9)


def test_compare_of_an_adapter_with_itself_is_1_and_with_its_negation_is_minus_1():
    state, _ = small_adapter()
    negated = lk.AdapterState(state.config, {k: -t if ".lora_B." in k else t for k, t in state.tensors.items()})
    for row in lk.compare(state, state):
        assert row["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert [row["phi"][i][i] for i in range(row["r1"])] == pytest.approx([1.0] * row["r1"], abs=1e-5)
    for row in lk.compare(state, negated):
        assert row["cosine"] == pytest.approx(-1.0, abs=1e-9)


def test_cli_inspect_and_compare_print_json_and_write_png_plots(tmp_path, capsys):
    state, deltas = deficient_adapter()
    state.save(tmp_path / "one")
    other, _ = deficient_adapter()
    other.tensors = {k: 2 * t if ".lora_B." in k else t for k, t in other.tensors.items()}
    other.save(tmp_path / "two")

    code, out, err = run_cli(capsys, "inspect", tmp_path / "one", "--json", "--plot", tmp_path / "spectrum.png")
    assert code == 0, err
    rows = {row["layer"]: row for row in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert {path: row["rank"] for path, row in rows.items()} == {"full": 4, "deficient": 2}
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == PNG_MAGIC

    code, out, err = run_cli(capsys, "inspect", tmp_path / "one")  # the table
    assert code == 0, err
    assert "deficient" in out

    png = tmp_path / "similarity.png"
    code, out, err = run_cli(capsys, "compare", tmp_path / "one", tmp_path / "two", "--json", "--plot", png)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {row["layer"] for row in rows} == set(deltas)
    assert all(row["cosine"] == pytest.approx(1.0, abs=1e-6) for row in rows)  # ΔW doubled: same direction
    assert png.read_bytes()[:8] == PNG_MAGIC


# -- bad input ---------------------------------------------------------------------------------------------


def write_weights(directory, name: str, tensors: dict[str, torch.Tensor]) -> str:
    path = directory / name
    save_file(tensors, path)
    return str(path)


def saved_small(directory, name: str) -> str:
    small_adapter()[0].save(directory / name)
    return str(directory / name)


def saved_unequal(directory) -> list[str]:
    one, two, _, _ = two_adapters(dtype=torch.float32)
    one.save(directory / "one")
    two.save(directory / "two")
    return [str(directory / "one"), str(directory / "two")]


def saved_mismatched(directory) -> list[str]:
    one, two, _, _ = two_adapters(dtype=torch.float32, second_shapes={"a.q": (40, 31, 3)})
    one.save(directory / "one")
    two.save(directory / "two")
    return [str(directory / "one"), str(directory / "two")]


def junk(directory) -> str:
    path = directory / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    return str(path)


def sharded(directory, *, index: str | None = None, shard: bytes | None = None, lists_extra: bool = False) -> str:
    """A model directory of two shards and model.safetensors.index.json; `index` replaces the index's text,
    `shard` the second shard's bytes, and `lists_extra` makes the index put a tensor in a shard that lacks it."""
    model = directory / "sharded"
    model.mkdir()
    save_file({"w.weight": W}, model / "model-00001-of-00002.safetensors")
    save_file({"v.weight": W.T.contiguous()}, model / "model-00002-of-00002.safetensors")
    if shard is not None:
        (model / "model-00002-of-00002.safetensors").write_bytes(shard)
    weight_map = {"w.weight": "model-00001-of-00002.safetensors", "v.weight": "model-00002-of-00002.safetensors"}
    if lists_extra:
        weight_map["u.weight"] = "model-00002-of-00002.safetensors"
    text = json.dumps({"metadata": {}, "weight_map": weight_map}) if index is None else index
    (model / "model.safetensors.index.json").write_text(text)
    return str(model)


def extract_sharded(directory, **damage) -> list[str]:
    return [
        "extract",
        sharded(directory, **damage),
        write_weights(directory, "t.safetensors", {"w.weight": W}),
        "--rank",
        "1",
    ]


def damaged_adapter(directory, config: dict | None = None, **factors: torch.Tensor) -> str:
    """A saved rank-2 adapter on one 8 × 6 layer with some of its factors (`lora_A`, `lora_B`) or config
    entries replaced."""
    path = directory / "damaged"
    adapter({"w": random_factors(8, 6, 2, seed=1)}).save(path)
    tensors = load_file(path / "adapter_model.safetensors")
    for name, tensor in factors.items():
        tensors[f"base_model.model.w.{name}.weight"] = tensor
    save_file(tensors, path / "adapter_model.safetensors")
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **(config or {})}))
    return str(path)


def saved_narrow(directory) -> str:
    """An adapter of r = 16 on an 8 × 40 layer."""
    adapter({"narrow": random_factors(8, 40, 16, seed=5)}, alpha=16.0).save(directory / "narrow")
    return str(directory / "narrow")


W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def extract_args(d, base, tuned, *flags) -> list[str]:
    return ["extract", write_weights(d, "base.safetensors", base), write_weights(d, "tuned.safetensors", tuned), *flags]


BAD_INPUT = {
    "mismatched-shapes": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": torch.zeros(6, 8)}, "--rank", "1"),
        "shape",
    ),
    "tuned-has-other-tensors": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W, "v.weight": W.clone()}, "--rank", "1"),
        "BASE lacks",
    ),
    "rank-larger-than-the-layer": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--rank", "7"),
        "larger than",
    ),
    "energy-0": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--energy", "0"),
        "energy fraction must be in (0, 1], got 0.0",
    ),
    "energy-negative": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--energy", "-0.5"),
        "energy fraction must be in (0, 1], got -0.5",
    ),
    "energy-above-1": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--energy", "1.5"),
        "energy fraction must be in (0, 1], got 1.5",
    ),
    "rank-0": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--rank", "0"),
        "rank must be a positive integer, got 0",
    ),
    "identical": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W.clone()}, "--rank", "1"),
        "no 2-D floating-point weight",
    ),
    "missing-base": (
        lambda d: ["extract", str(d / "nope"), write_weights(d, "t.safetensors", {"w.weight": W}), "--rank", "1"],
        "no such file",
    ),
    "missing-tuned": (
        lambda d: ["extract", write_weights(d, "b.safetensors", {"w.weight": W}), str(d / "nope.st"), "--rank", "1"],
        "no such file",
    ),
    "not-safetensors": (
        lambda d: ["extract", write_weights(d, "b.safetensors", {"w.weight": W}), junk(d), "--rank", "1"],
        "not a readable safetensors",
    ),
    "corrupt-shard": (
        lambda d: extract_sharded(d, shard=b"not a safetensors file"),
        "model-00002-of-00002.safetensors is not a readable safetensors file",
    ),
    "shard-lacks-a-listed-tensor": (
        lambda d: extract_sharded(d, lists_extra=True),
        "model.safetensors.index.json puts 'u.weight' in model-00002-of-00002.safetensors, which does not hold it",
    ),
    "index-without-weight-map": (
        lambda d: extract_sharded(d, index='{"metadata": {}}'),
        'model.safetensors.index.json has no "weight_map"',
    ),
    "index-not-json": (
        lambda d: extract_sharded(d, index='{"weight_map": '),
        "model.safetensors.index.json is not valid JSON",
    ),
    "resize-missing": (lambda d: ["resize", str(d / "nope"), "--rank", "1"], "no adapter directory"),
    "resize-rank-above-adapter": (lambda d: ["resize", saved_small(d, "a"), "--rank", "6"], "larger than"),
    "resize-energy-above-1": (lambda d: ["resize", saved_small(d, "a"), "--energy", "1.5"], "energy fraction must be"),
    "resize-rank-above-layer": (lambda d: ["resize", saved_narrow(d), "--rank", "12"], "(8 × 40, rank 16) allows"),
    "combine-missing": (lambda d: ["combine", saved_small(d, "a"), str(d / "nope")], "no adapter directory"),
    "combine-linear-unequal-ranks": (lambda d: ["combine", *saved_unequal(d), "--method", "linear"], "equal ranks"),
    "combine-mismatched-shapes": (lambda d: ["combine", *saved_mismatched(d), "--method", "cat"], "different shapes"),
    "combine-one-adapter": (lambda d: ["combine", saved_small(d, "a")], "at least two"),
    "combine-weights": (lambda d: ["combine", *saved_unequal(d), "--weights", "1"], "got 1 weights for 2 adapters"),
    "combine-rank-0": (lambda d: ["combine", *saved_unequal(d), "--rank", "0"], "rank must be a positive integer"),
    "combine-rank-with-cat": (
        lambda d: ["combine", *saved_unequal(d), "--method", "cat", "--rank", "2"],
        "a rank only applies to method 'svd'",
    ),
    "combine-weights-not-finite": (
        lambda d: ["combine", *saved_unequal(d), "--weights", "inf", "1"],
        "weights must be finite numbers, got [inf, 1.0]",
    ),
    "shard-outside-the-directory": (
        lambda d: extract_sharded(d, index=json.dumps({"weight_map": {"w.weight": "../t.safetensors"}})),
        "names a shard outside its directory: '../t.safetensors'",
    ),
    "extract-targets-bad-regex": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + 1}, "--rank", "1", "--targets", "["),
        "invalid regular expression '['",
    ),
    "extract-energy-nan": (
        lambda d: extract_args(d, {"w.weight": W}, {"w.weight": W + float("nan")}, "--energy", "0.5"),
        "contains NaN or inf",
    ),
    "inspect-factors-of-two-ranks": (
        lambda d: ["inspect", damaged_adapter(d, lora_B=torch.zeros(8, 3))],
        "are not the two factors of one rank-r update",
    ),
    "inspect-rank-0": (
        lambda d: ["inspect", damaged_adapter(d, lora_A=torch.zeros(0, 6), lora_B=torch.zeros(8, 0))],
        "are not the two factors of one rank-r update",
    ),
    "inspect-1d-factor": (lambda d: ["inspect", damaged_adapter(d, lora_A=torch.zeros(4))], "are not the two factors"),
    "resize-inf-factor": (
        lambda d: ["resize", damaged_adapter(d, lora_A=torch.full((2, 6), math.inf)), "--rank", "1"],
        "holds NaN or inf",
    ),
    "inspect-rank-pattern-not-a-dict": (
        lambda d: ["inspect", damaged_adapter(d, config={"rank_pattern": [1]})],
        "rank_pattern must map module patterns to values, got [1]",
    ),
    "inspect-missing": (lambda d: ["inspect", str(d / "nope")], "no adapter directory"),
    "compare-missing": (lambda d: ["compare", saved_small(d, "a"), str(d / "nope")], "no adapter directory"),
}
WRITES = ("extract", "resize", "combine")


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_error_line_exit_code_2_and_writes_nothing(case, tmp_path, capsys):
    make_args, message = BAD_INPUT[case]
    argv = make_args(tmp_path)
    out_dir = tmp_path / "out"
    if argv[0] in WRITES:
        argv += ["--out", str(out_dir)]
    entries_before = set(tmp_path.iterdir())
    err = cli_error(argv, capsys)
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # no argparse usage lines: the library checks its arguments
    assert not out_dir.exists()
    assert set(tmp_path.iterdir()) == entries_before  # no temporary directory left behind either


@pytest.mark.parametrize("energy", [0, -0.5, 1.5])
def test_api_refuses_an_energy_fraction_outside_0_1(energy):
    base = {"w.weight": W}
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        lk.extract(base, {"w.weight": W + 1}, energy=energy)
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        lk.resize(small_adapter()[0], energy=energy)


def test_api_refuses_a_rank_larger_than_the_layer_and_mismatched_shapes():
    with pytest.raises(ValueError, match="larger than"):
        lk.extract({"w.weight": W}, {"w.weight": W + 1}, r=7)
    with pytest.raises(ValueError, match="shape"):
        lk.extract({"w.weight": W}, {"w.weight": torch.zeros(6, 8)}, r=1)
    with pytest.raises(ValueError, match="no 2-D floating-point weight differs"):
        lk.extract({"w.weight": W}, {"w.weight": W.clone()}, r=1)


def test_api_checks_the_rank_and_energy_arguments_before_reading_anything(tmp_path):
    nowhere = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape("energy fraction must be in (0, 1], got 1.5")):
        lk.extract(nowhere, nowhere, energy=1.5)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        lk.resize(nowhere, r=0)
    with pytest.raises(ValueError, match="exactly one of a rank or an energy fraction"):
        lk.resize(nowhere, r=2, energy=0.5)
    with pytest.raises(ValueError, match="rank must be a positive integer, got -1"):
        lk.combine([nowhere, nowhere], r=-1)
    with pytest.raises(ValueError, match="a rank only applies to method 'svd'"):
        lk.combine([nowhere, nowhere], method="cat", r=2)


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `lorakit inspect --json | head -c1` once head has exited
    with os.fdopen(write_end, "wb") as closed:
        argv = [sys.executable, "-m", "lorakit", "inspect", saved_small(tmp_path, "a"), "--json"]
        result = subprocess.run(argv, stdout=closed, stderr=subprocess.PIPE, text=True)
    assert (result.returncode, result.stderr) == (1, "")


def test_extract_leaves_integer_tensors_alone():
    counts = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    state = lk.extract({"w.weight": W, "c.weight": counts}, {"w.weight": W + 1, "c.weight": counts + 1}, r=1)
    assert state.report["other_changed"] == ["c.weight"] and list(state.report["layers"]) == ["w"]


class Nested(nn.Module):
    """Two layers whose paths end alike: "fc" and "block.fc"."""

    def __init__(self):
        super().__init__()
        self.fc, self.block = nn.Linear(6, 6), nn.Sequential()
        self.block.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.block.fc(self.fc(x))


def test_per_layer_ranks_of_paths_that_end_alike_reload_in_lorakit_and_peft(tmp_path):
    def base():
        torch.manual_seed(0)
        return Nested().double()

    model = lk.inject(base(), lk.LoraConfig(r=4, alpha=4, target_modules=["fc"], init=False))
    with torch.no_grad():
        model.fc.lora_B["default"][:, 1:] = 0  # fc's update has rank 1, block.fc's rank 4
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x).detach()
    lk.save_adapter(model, tmp_path / "a")
    resized = lk.resize(tmp_path / "a", energy=0.999)
    assert {path: layer["rank"] for path, layer in resized.report["layers"].items()} == {"block.fc": 4, "fc": 1}
    resized.save(tmp_path / "b")
    ours = lk.load_adapter(base(), tmp_path / "b")
    theirs = PeftModel.from_pretrained(base(), tmp_path / "b")
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(theirs(x), expected)
