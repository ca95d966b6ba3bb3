"""The benchmark suite (bench/) keeps working (one run at tiny sizes, `python -m bench --quick`: slow), refuses bad
arguments before anything runs, and its statistics."""

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import WorkerFailed, main, worker
from bench.timing import ratio_interval, summary

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/bench/ is two levels down


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quick", "--repeats", "5"], "--quick runs its own settings: drop --repeats"),
        (["--repeats", "0"], "--processes, --repeats and --threads must be positive"),
        (["--markdown", "{tmp}"], "--markdown {tmp} is a directory"),
        (["--out", "{tmp}/missing/results.json"], "--out {tmp}/missing/results.json: no directory {tmp}/missing"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, message, monkeypatch, capsys):
    # `python -m bench ARGS`, in this process (the quick run below starts the module itself)
    monkeypatch.setattr(sys, "argv", ["bench", *(a.format(tmp=tmp_path) for a in args)])
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("a bench process was started"))
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(message.format(tmp=tmp_path))


@pytest.mark.slow
def test_quick_benchmark_run_writes_results_and_summary(tmp_path):
    results, summary = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    command = [sys.executable, "-m", "bench", "--quick", "--out", str(results), "--markdown", str(summary)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["command"].startswith("python -m bench --quick")
    assert {"cpu", "torch", "peft", "transformers"} <= set(data["machine"])
    cases = data["settings"]["llama-quick"]["cases"]
    expected = {"training step", "unmerged inference 2×16", "unmerged inference 1×8", "merged inference 2×16",
                "mixed adapters 4×16", "peak training memory"}  # fmt: skip
    assert set(cases) == expected
    step = cases["training step"]
    assert set(step["seconds"]) == {"lorakit", "peft", "floor"} and all(v > 0 for v in step["seconds"].values())
    (ours,), (theirs,) = step["samples"]["lorakit"], step["samples"]["peft"]  # one process, 3 rounds
    assert len(ours) == 3 and step["seconds"]["lorakit"] == statistics.median(ours)
    assert step["ratios"]["lorakit / peft"] == statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    low, high = step["intervals"]["lorakit / peft"]
    assert 0 < low <= high
    assert data["processes"] == 1 and step["per_process"]["lorakit / peft"] == [step["ratios"]["lorakit / peft"]]
    assert cases["peak training memory"]["bytes"]["lorakit"] > 0
    text = summary.read_text()
    assert "| training step | lorakit / floor |" in text and data["command"] in text


def test_ratio_interval_is_exact_for_a_constant_ratio():
    base = [[1.0, 1.3, 0.9, 1.1, 1.2, 1.0], [0.8, 1.4, 1.0]]
    assert ratio_interval([[2 * t for t in p] for p in base], base) == pytest.approx((2.0, 2.0))


def test_ratio_is_the_median_of_round_by_round_ratios_pooled_over_processes():
    base = [[1.0, 2.0, 4.0], [8.0, 8.0]]  # the machine's speed drifts between rounds and between processes
    ours = [[1.1, 2.0, 4.8], [8.8, 9.6]]  # round by round: 1.1, 1.0, 1.2 and 1.1, 1.2
    result = summary({"ours": ours, "base": base}, {"ours / base": ("ours", "base")})
    assert result["ratios"]["ours / base"] == pytest.approx(1.1)  # the ratio of pooled medians: 4.8 / 4.0 = 1.2
    assert result["per_process"]["ours / base"] == pytest.approx([1.1, 1.15])
    assert result["seconds"] == {"ours": 4.8, "base": 4.0}


def test_processes_that_disagree_widen_the_interval_beyond_what_the_rounds_alone_give():
    rng = random.Random(0)
    base = [[rng.gauss(1.0, 0.01) for _ in range(20)] for _ in range(4)]
    offsets = [1.00, 1.02, 1.06, 1.03]  # each process's own ratio: where the allocator put things, say
    ours = [[offset * t * rng.gauss(1.0, 0.003) for t in p] for offset, p in zip(offsets, base, strict=True)]
    low, high = ratio_interval(ours, base)
    pooled_low, pooled_high = ratio_interval([[t for p in ours for t in p]], [[t for p in base for t in p]])
    assert high - low > 2 * (pooled_high - pooled_low)  # the rounds alone would claim far more precision
    assert low < 1.02 and high > 1.04
    result = summary({"ours": ours, "base": base}, {"ours / base": ("ours", "base")})
    assert result["per_process"]["ours / base"] == pytest.approx(offsets, rel=0.01)


def test_ratio_interval_covers_the_true_ratio_and_narrows_with_more_rounds():
    def widths_and_cover(rounds: int) -> tuple[float, bool]:
        rng = random.Random(rounds)
        drift = [1 + 0.2 * rng.random() for _ in range(rounds)]  # the machine's speed, shared within a round
        base = [d * rng.gauss(1.0, 0.02) for d in drift]
        ours = [1.05 * d * rng.gauss(1.0, 0.02) for d in drift]
        low, high = ratio_interval([ours], [base])
        return high - low, low <= 1.05 <= high

    (wide, covered_few), (narrow, covered_many) = widths_and_cover(10), widths_and_cover(200)
    assert covered_few and covered_many
    assert narrow < wide / 2


def test_a_failed_worker_is_one_error_naming_its_command_and_its_last_words():
    with pytest.raises(WorkerFailed) as failed:
        worker("bench.cases", "llama-quick", "no such case", 1, 1, 0)
    message = str(failed.value)
    assert message.startswith("python -m bench.cases llama-quick 'no such case' 1 1 0 exited with 1: ")
    assert message.endswith("no case 'no such case' in llama-quick; it has: training step, unmerged inference 2×16, "
                            "unmerged inference 1×8, merged inference 2×16, mixed adapters 4×16")  # fmt: skip


def test_each_process_builds_the_candidates_in_another_order():
    from bench.cases import built_in_turn

    built = []

    def builder(name):
        return lambda: built.append(name) or name

    for process in range(4):
        models = built_in_turn({name: builder(name) for name in "abc"}, process)
        assert models == {"a": "a", "b": "b", "c": "c"}  # returned in the candidates' own order
    assert "".join(built) == "abc" + "bca" + "cab" + "abc"


def test_unknown_cases_and_cases_without_a_results_file_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("a bench process was started"))
    for args, message in (
        (["--cases", "nope"], "no case 'nope' in llama-reference, gpt2-conv1d; the cases: "),
        (["--cases", "dora training step", "--out", f"{tmp_path}/r.json"], f"{tmp_path}/r.json, which does not exist"),
    ):
        monkeypatch.setattr(sys, "argv", ["bench", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cases_measured_again_replace_theirs_and_keep_everything_else(tmp_path, monkeypatch):
    """`python -m bench --cases ...` puts the named cases' results into the existing file, each with the command
    that measured it, and BENCHMARKS.md says so under its table."""
    import bench.__main__ as bench_main

    def case(ratio):
        return {"seconds": {"a": 1.0, "b": 1.0}, "ratios": {"a / b": ratio}, "intervals": {"a / b": [ratio, ratio]}}

    machine = {"cpu": "x", "cores": 2, "threads": 2, "device": "cpu", "python": "3", "torch": "2", "peft": "0",
               "transformers": "5"}  # fmt: skip
    cases = {"training step": case(0.9), "dora training step": case(2.0)}
    old = {"command": "python -m bench", "machine": machine, "dtype": "float32", "processes": 4, "repeats": 10,
           "seconds": 1.0, "settings": {"llama-reference": {"description": "d", "cases": cases}}}  # fmt: skip
    results, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    results.write_text(json.dumps(old))
    fresh = {"description": "d", "cases": {"dora training step": case(0.8)}}
    monkeypatch.setattr(bench_main, "run_setting", lambda setting, *args: fresh)
    argv = ["--settings", "llama-reference", "--cases", "dora training step", "--out", str(results)]
    monkeypatch.setattr(sys, "argv", ["bench", *argv, "--markdown", str(markdown), "--processes", "2"])
    main()
    cases = json.loads(results.read_text())["settings"]["llama-reference"]["cases"]
    assert cases["training step"] == case(0.9)
    assert cases["dora training step"]["ratios"] == {"a / b": 0.8}
    assert cases["dora training step"]["command"].startswith("python -m bench --settings llama-reference --cases")
    assert "dora training step: measured apart by `python -m bench --settings" in markdown.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_qlora_memory_case_runs_every_candidate_and_reports_its_figures(quantizable_llama, checkpointing):
    """bench.qlora's candidates on the tiny Llama (the case itself loads a 374 M-parameter model: `python -m
    bench.qlora`), in this process: each loads, adapts and trains, and the two libraries' losses agree."""
    from bench.qlora import CANDIDATES, STEPS, run
    from bench.report import qlora_section

    figures = {candidate: run(candidate, quantizable_llama, checkpointing) for candidate in CANDIDATES}
    for candidate, f in figures.items():
        assert len(f["losses"]) == len(f["step_seconds"]) == STEPS, candidate
        # the kernel batches its per-thread resident counters: the high-water mark may trail by a few pages
        assert f["peak"] + 2**20 >= max(f["loaded"], f["after_steps"]) > 0, candidate
    for precision in ("float32", "4-bit"):  # the same model, adapter shapes and steps: the same losses
        ours, theirs = figures[f"lorakit {precision}"]["losses"], figures[f"peft {precision}"]["losses"]
        assert ours[0] == pytest.approx(theirs[0], rel=1e-4), precision
    ratios = {"lorakit 4-bit / lorakit float32": {"value": 0.4, "target": "≤ 0.50", "met": True}}
    results = {"command": "python -m bench.qlora", "threads": 2, "torch": "2", "settings": {}}
    results["settings"]["plain"] = {"candidates": figures, "ratios": ratios}
    table = "\n".join(qlora_section(results))
    assert "| lorakit 4-bit | " in table and "| lorakit 4-bit / lorakit float32 | 0.400 | ≤ 0.50 | yes |" in table
