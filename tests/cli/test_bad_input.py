"""Every traceback and silent wrong answer of issue 18, as a command line: each is now one `lorakit: error:` line and
exit 2, with every file as it was and nothing written; or, where the input is sound after all, a clean success.

Also: an output never lands on an input, for every command that writes; `--out ""` is never the current
directory; an --out that cannot be written is found before the model loads; a file that cannot be read for want of
permission is said to be so, not missing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_error, finetune_args, run_cli, small_adapter, tree, two_adapters
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.engine.model import adapter_parameters
from lorakit.training.checkpoint import TENSORS_NAME, latest_checkpoint

DEEP = "[" * 100_000  # Python's JSON parser recurses once a level: RecursionError without a bound


@pytest.fixture(scope="module")
def finished_run(tiny_llama, word_data, tmp_path_factory) -> Path:
    """A finished run of the tiny Llama, 2 steps with a checkpoint after each."""
    from lorakit.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        main(finetune_args(tiny_llama, word_data, out, "--steps", "2", "--save-every", "1", "--batch-size", "4")) == 0
    )
    return out


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run, to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def resume(tiny_llama, word_data, out, steps=3) -> list[str]:
    return finetune_args(
        tiny_llama, word_data, out, "--steps", str(steps), "--save-every", "1", "--batch-size", "4", "--resume"
    )


def adapter_dir(tmp_path, name="adapter", config=None, A=None, B=None, extra=None) -> Path:
    """The small three-layer adapter saved as `name`, with config fields, a.q's factors `A` and `B`, and tensors
    `extra` ({key after the prefix: tensor}) replaced or added."""
    path = tmp_path / name
    small_adapter()[0].save(path)
    weights = load_file(path / "adapter_model.safetensors")
    changed = {"a.q.lora_A.weight": A, "a.q.lora_B.weight": B, **(extra or {})}
    weights.update({f"base_model.model.{key}": t for key, t in changed.items() if t is not None})
    save_file(weights, path / "adapter_model.safetensors")
    raw = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**raw, **(config or {})}))
    return path


def raw_config(path: Path, text: str) -> Path:
    (path / "adapter_config.json").write_text(text)
    return path


# Each case: (argv from tmp_path, a part of the one error line). a.q is 40 × 30 at rank 6.
CASES = {
    "zero-sized-B": (lambda d: ["inspect", adapter_dir(d, B=torch.zeros(0, 6))], "not the two factors"),
    "zero-sized-A-rows": (
        lambda d: [
            "resize",
            adapter_dir(d, A=torch.zeros(0, 30), B=torch.zeros(40, 0)),
            "--rank",
            "1",
            "--out",
            d / "out",
        ],
        "not the two factors",
    ),
    "alpha-10**400": (
        lambda d: [
            "inspect",
            raw_config(
                adapter_dir(d),
                '{"peft_type": "LORA", "r": 6, "target_modules": ["a.q"], "lora_alpha": 1' + "0" * 400 + "}",
            ),
        ],
        "a number of 401 digits",
    ),
    "alpha-1.7e308-resize": (
        lambda d: [
            "resize",
            adapter_dir(d, config={"lora_alpha": 1.7e308, "alpha_pattern": {}}),
            "--rank",
            "2",
            "--out",
            d / "out",
        ],
        "the update of layer a.q holds NaN or inf, or is beyond float64's range",
    ),
    "r-5000-digits": (
        lambda d: ["inspect", raw_config(adapter_dir(d), '{"peft_type": "LORA", "r": ' + "7" * 5000 + "}")],
        "a number of 5000 digits",
    ),
    "bad-regex": (lambda d: ["inspect", adapter_dir(d, config={"exclude_modules": "(?P<"})], "invalid regular expr"),
    "deep-config": (lambda d: ["inspect", raw_config(adapter_dir(d), DEEP)], "nested deeper than 64 levels"),
    "big-config": (
        lambda d: ["inspect", raw_config(adapter_dir(d), json.dumps({"pad": "x" * (17 * 2**20)}))],
        "more than the 16,777,216 a JSON file",
    ),
    "rslora-text": (lambda d: ["inspect", adapter_dir(d, config={"use_rslora": "false"})], "must be true or false"),
    "dropout-text": (lambda d: ["inspect", adapter_dir(d, config={"lora_dropout": "0.1"})], "must be a number"),
    "float8-factor": (
        lambda d: ["inspect", adapter_dir(d, A=torch.zeros(6, 30).to(torch.float8_e4m3fn))],
        "is of type F8_E4M3",
    ),
    "integer-factor": (
        lambda d: [
            "resize",
            adapter_dir(d, B=torch.ones(40, 6, dtype=torch.int32)),
            "--rank",
            "1",
            "--out",
            d / "out",
        ],
        "is of type I32",
    ),
    "lone-B": (
        lambda d: [
            "combine",
            adapter_dir(d, extra={"b.lora_B.weight": torch.ones(3, 2)}),
            adapter_dir(d, "other"),
            "--out",
            d / "out",
        ],
        "has base_model.model.b.lora_B.weight but no base_model.model.b.lora_A.weight",
    ),
    "combine-overflow-svd": (
        lambda d: ["combine", *two(d), "--weights", "1e308", "1e308", "--out", d / "out"],
        "the weighted sum of layer a.q holds NaN or inf",
    ),
    "combine-overflow-cat": (
        lambda d: ["combine", *two(d), "--weights", "1e308", "1e308", "--method", "cat", "--out", d / "out"],
        "layer a.q: the resulting factors hold NaN or inf in torch.float32",
    ),
    "combine-other-base": (
        lambda d: [
            "combine",
            adapter_dir(d, "one", config={"base_model_name_or_path": "llama"}),
            adapter_dir(d, "two", config={"base_model_name_or_path": "gpt2"}),
            "--out",
            d / "out",
        ],
        "adapters 1 and 2 are for different base models, 'llama' and 'gpt2'",
    ),
    "compare-other-base": (
        lambda d: [
            "compare",
            adapter_dir(d, "one", config={"base_model_name_or_path": "./llama"}),
            adapter_dir(d, "two", config={"base_model_name_or_path": "gpt2"}),
        ],
        "different base models",
    ),
    "path-with-a-newline": (lambda d: ["inspect", d / "two\nlines"], "no adapter directory at"),
    "out-empty-resize": (lambda d: ["resize", adapter_dir(d), "--rank", "1", "--out", ""], "--out must not be empty"),
    "out-empty-combine": (lambda d: ["combine", *two(d), "--out", ""], "--out must not be empty"),
    "out-is-the-adapter": (
        lambda d: ["resize", adapter_dir(d), "--rank", "1", "--out", d / "adapter"],
        "is the adapter",
    ),
    "out-inside-an-adapter": (lambda d: ["combine", *two(d), "--out", d / "one" / "sum"], "is inside the adapter"),
    "out-around-the-inputs": (lambda d: ["combine", *two(d), "--out", d], "contains the adapter"),
    "extract-out-is-base": (
        lambda d: [
            "extract",
            weights_file(d, "base"),
            weights_file(d, "tuned"),
            "--rank",
            "1",
            "--out",
            d / "base.safetensors",
        ],
        "is the BASE",
    ),
    "plot-onto-the-weights": (
        lambda d: ["inspect", adapter_dir(d), "--plot", d / "adapter" / "adapter_model.safetensors"],
        "--plot",
    ),
    "rank-plot-onto-its-file": (lambda d: ["rank", weights_file(d, "m"), "--plot", d / "m.safetensors"], "is the"),
    "study-out-is-the-model": (lambda d: ["study", *study_inputs(d), "--out", d / "model"], "is the model directory"),
    "study-out-around-the-data": (lambda d: ["study", *study_inputs(d), "--out", d], "contains the model directory"),
    "npy-header-1e9x1e6": (lambda d: ["rank", forged_npy(d)], "its header announces shape (1000000000, 1000000)"),
    "out-unwritable": (
        lambda d: ["resize", adapter_dir(d), "--rank", "1", "--out", "/proc/lorakit/out"],
        "cannot write /proc/lorakit/out",
    ),
    "deep-shard-index": (
        lambda d: ["extract", sharded(d, DEEP), weights_file(d, "t"), "--rank", "1", "--out", d / "o"],
        "nested deeper than 64 levels",
    ),
}


def two(d: Path) -> list[Path]:
    one, two_, _, _ = two_adapters(dtype=torch.float32)
    one.save(d / "one")
    two_.save(d / "two")
    return [d / "one", d / "two"]


def forged_npy(d: Path) -> Path:
    """A .npy file of 64 bytes of data whose header claims a (1e9, 1e6) float64 array: 8 PB."""
    import numpy as np

    with open(d / "forged.npy", "wb") as handle:
        header = {"descr": "<f8", "fortran_order": False, "shape": (10**9, 10**6)}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(bytes(64))
    return d / "forged.npy"


def study_inputs(d: Path) -> list:
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    for name in ("train", "eval"):
        (d / f"{name}.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    return ["--model", d / "model", "--data", d / "train.jsonl", "--eval-data", d / "eval.jsonl"]


def weights_file(d: Path, name: str) -> Path:
    save_file(
        {"w.weight": torch.randn(8, 6, generator=torch.Generator().manual_seed(len(name)))}, d / f"{name}.safetensors"
    )
    return d / f"{name}.safetensors"


def sharded(d: Path, index: str) -> Path:
    (d / "model").mkdir()
    save_file({"w.weight": torch.randn(8, 6)}, d / "model" / "model.safetensors")
    (d / "model" / "model.safetensors.index.json").write_text(index)
    return d / "model"


@pytest.mark.parametrize("case", list(CASES))
def test_each_failure_of_the_issue_is_one_line_exit_2_and_changes_no_file(case, tmp_path, capsys):
    make_argv, message = CASES[case]
    argv = [str(a) for a in make_argv(tmp_path)]
    before = tree(tmp_path)
    err = cli_error(argv, capsys)
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert tree(tmp_path) == before  # no file changed, none written, no temporary left


def test_a_global_flag_inside_a_pattern_and_a_sound_but_odd_config_succeed(tmp_path, capsys):
    path = adapter_dir(tmp_path, config={"rank_pattern": {"(?i)A\\.Q": 6}, "lora_dropout": None})
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0 and err == "", err
    assert {json.loads(line)["layer"] for line in out.splitlines()} == {"a.q", "a.v", "b.o"}


def test_a_full_disk_names_the_output_not_a_temporary(tmp_path, capsys, monkeypatch):
    def full(self, data):
        raise OSError(28, "No space left on device")

    source = adapter_dir(tmp_path)
    monkeypatch.setattr(Path, "write_bytes", full)
    err = cli_error(["resize", str(source), "--rank", "1", "--out", str(tmp_path / "out")], capsys)
    assert err == f"lorakit: error: [Errno 28] cannot write {tmp_path / 'out'}: No space left on device\n"
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_rank_past_the_memory_available_with_the_figure_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the demo started its work before estimating its memory")

    monkeypatch.setattr("lorakit.io.untrusted.available_memory", lambda: 4 * 10**9)  # the same on every machine
    monkeypatch.setattr("lorakit.demo.experiment.load_digits_split", no_work)
    err = cli_error(["demo", "--rank", "100000", "--out", str(tmp_path / "demo")], capsys)
    assert "lorakit demo --rank 100000 needs about 31.6 GB of memory, and 4.0 GB are available" in err, err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_merge_refuses_an_update_past_the_range_of_its_dtype_naming_the_weight(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = lk.inject(AutoModelForCausalLM.from_pretrained(tiny_llama), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            p.fill_(1e4 if "lora_B" in name else 1.0)  # ΔW = 4 · 2 · 1e4 = 8e4 each: past float16's 65504
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    before = tree(tmp_path)
    argv = ["merge", "--model", tiny_llama, "--adapter", adapter, "--out", tmp_path / "merged", "--dtype", "float16"]
    err = cli_error([str(a) for a in argv], capsys)
    assert (
        "not writing the merged model: model.layers.0.self_attn.q_proj.weight holds NaN or inf in torch.float16" in err
    )
    assert len(err.splitlines()) == 1 and tree(tmp_path) == before


# -- finetune ------------------------------------------------------------------------------------------------------


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("lorakit.training.loop.load_model_and_tokenizer", refuse)


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda d, model, data: "", "--out must not be empty"),
        (lambda d, model, data: model, "is the model directory"),
        (lambda d, model, data: model / "adapter", "is inside the model directory"),
        (lambda d, model, data: data.parent, "contains the data"),
        (lambda d, model, data: "/proc/lorakit-run", "cannot write /proc/lorakit-run"),
    ],
    ids=["empty", "model", "inside-model", "around-data", "unwritable"],
)
def test_finetune_refuses_an_out_on_an_input_or_unwritable_before_loading_anything(
    tiny_llama, word_data, tmp_path, capsys, monkeypatch, make_out, message
):
    no_model_load(monkeypatch)
    before = tree(tiny_llama), tree(word_data.parent)
    err = cli_error(finetune_args(tiny_llama, word_data, make_out(tmp_path, tiny_llama, word_data)), capsys)
    assert message in err and len(err.splitlines()) == 1, err
    assert (tree(tiny_llama), tree(word_data.parent)) == before


def test_finetune_refuses_a_seed_past_the_generators_range(tiny_llama, word_data, tmp_path, capsys):
    err = cli_error([*finetune_args(tiny_llama, word_data, tmp_path / "run"), "--seed", str(10**15)], capsys)
    assert "--seed must be an integer in [0, 2**32), got 1000000000000000" in err


@pytest.mark.parametrize(
    "rows, message",
    [
        ("[" * 100_000, "line 1: JSON nested deeper than 64 levels"),
        ('{"text": ' + "9" * 5000 + "}", "line 1: a number of 5000 digits"),
    ],
    ids=["deep", "long-number"],
)
def test_finetune_refuses_data_nested_too_deeply_naming_the_line(tiny_llama, tmp_path, capsys, rows, message):
    data = tmp_path / "train.jsonl"
    data.write_text(rows + "\n")
    err = cli_error(finetune_args(tiny_llama, data, tmp_path / "run"), capsys)
    assert f"{data}: {message}" in err
    assert not (tmp_path / "run").exists()


def test_resume_from_a_checkpoint_with_a_damaged_generator_state_is_one_line(tiny_llama, word_data, run, capsys):
    checkpoint = latest_checkpoint(run)
    tensors = load_file(checkpoint / TENSORS_NAME)
    tensors["rng.torch"] = torch.full_like(tensors["rng.torch"], 255)  # the right size, no Mersenne Twister state
    save_file(tensors, checkpoint / TENSORS_NAME)
    before = tree(run)
    err = cli_error(resume(tiny_llama, word_data, run), capsys)
    assert "rng.torch is not a valid CPU generator state" in err and len(err.splitlines()) == 1
    assert tree(run) == before


def test_resume_with_a_deeply_nested_trainer_state_is_one_line(tiny_llama, word_data, run, capsys):
    (latest_checkpoint(run) / "trainer_state.json").write_text(DEEP)
    err = cli_error(resume(tiny_llama, word_data, run), capsys)
    assert "trainer_state.json: JSON nested deeper than 64 levels" in err


@pytest.mark.parametrize(
    "damage",
    ['{"step": "9", "loss": 1.0}', '{"step": 1, "lo', DEEP[:1000], "[1, 2]"],
    ids=["step-as-text", "torn-in-the-middle", "deep", "not-an-object"],
)
def test_a_damaged_log_line_never_blocks_a_resume(tiny_llama, word_data, run, capsys, damage):
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], damage, *lines[1:]]) + "\n")
    code, _, err = run_cli(capsys, *resume(tiny_llama, word_data, run))
    assert code == 0, err
    assert "1 damaged line(s) dropped from the log" in err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


# -- permission ----------------------------------------------------------------------------------------------------


def as_another_user(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`lorakit argv` as an unprivileged user, for whom a mode-000 file cannot be read (root reads everything)."""
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, cwd=cwd)
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's privileges")
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "lorakit", *argv]
    env = {**os.environ, "MPLCONFIGDIR": str(cwd), "HOME": str(cwd)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    if "No module named" in result.stderr or (
        "Permission denied" in result.stderr and "lorakit: error" not in result.stderr
    ):
        pytest.skip("the virtual environment is not readable by an unprivileged user")
    return result


@pytest.mark.slow
def test_a_file_that_cannot_be_read_is_said_to_be_so_not_missing(tmp_path):
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's temporary root is private to its user
        if parent.stat().st_uid == os.geteuid() and not parent.stat().st_mode & 0o001:
            parent.chmod(parent.stat().st_mode | 0o001)
    path = adapter_dir(tmp_path)
    path.chmod(0o755)
    (path / "adapter_config.json").chmod(0o644)
    (path / "adapter_model.safetensors").chmod(0o000)
    result = as_another_user(["inspect", str(path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lorakit: error: [Errno 13] Permission denied: '{path / 'adapter_model.safetensors'}'"
    )
