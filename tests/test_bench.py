"""The benchmark suite keeps working: one run at tiny sizes (`python -m bench --quick`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    assert step["ratios"]["lorakit / peft"] == step["seconds"]["lorakit"] / step["seconds"]["peft"]
    assert cases["peak training memory"]["bytes"]["lorakit"] > 0
    text = summary.read_text()
    assert "| training step | lorakit / floor |" in text and data["command"] in text
