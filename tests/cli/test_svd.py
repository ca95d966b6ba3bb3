"""`lorakit extract`, `resize`, `combine`, `inspect` and `compare` (lorakit.cli.svd): model directories, shards
and files in, adapters that load with the tuned logits out, JSON and PNG plots; and bad input ends in one
`lorakit: error: ...` line and exit code 2, with nothing written."""

import json
import math

import pytest
import torch
from helpers import (
    PLANTED,
    PNG_MAGIC,
    PREFIX,
    adapter,
    assert_loads_with_logits,
    base_state,
    build_tiny_gpt2,
    build_tiny_llama,
    cli_error,
    deficient_adapter,
    layer_deltas,
    logits,
    plant,
    random_factors,
    relative,
    run_cli,
    saved_small,
    tuned_model,
    two_adapters,
    weighted_sum,
)
from safetensors.torch import load_file, save_file

import lorakit as lk

# -- extract -------------------------------------------------------------------------------------------------------


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


# -- combine, inspect and compare ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("columns", [100, 160])
def test_cli_inspect_cuts_layer_names_from_their_start_to_fit_columns_keeping_them_apart(
    tmp_path, capsys, monkeypatch, columns
):
    paths = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qkvo"]
    adapter({path: random_factors(8, 8, 2, seed) for seed, path in enumerate(paths)}).save(tmp_path / "a")
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run_cli(capsys, "inspect", tmp_path / "a")
    assert code == 0, err
    rows = [line.split("│")[0].strip() for line in out.splitlines() if line.count("│") == 8]
    assert max(map(len, out.splitlines())) <= columns
    if columns == 100:  # too narrow for whole names: each ends as its layer's does
        assert rows == ["…" + path[len(path) - len(row) + 1 :] for path, row in zip(sorted(paths), rows, strict=True)]
        assert rows[0] == "…0.self_attn.k_proj"
    else:
        assert rows == sorted(paths)


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


# -- bad input -----------------------------------------------------------------------------------------------------


def write_weights(directory, name: str, tensors: dict[str, torch.Tensor]) -> str:
    path = directory / name
    save_file(tensors, path)
    return str(path)


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
        "rank_pattern must be an object of patterns to integers, got [1]",
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
