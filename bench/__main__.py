"""`python -m bench`: run the suite, write bench/results.json and BENCHMARKS.md.

python -m bench [--quick] [--settings llama-reference gpt2-conv1d] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import cases
from bench.models import GPT2, QUICK, REFERENCE, SETTINGS, Setting
from bench.report import write_markdown

ROOT = Path(__file__).resolve().parent.parent

# The targets of the performance issue, on the reference setting.
TARGETS = {
    ("training step", "lorakit / peft"): 0.90,
    ("training step", "lorakit / floor"): 1.12,
    ("unmerged inference {big}", "lorakit / base"): 1.03,
    ("unmerged inference {small}", "lorakit / base"): 1.08,
    ("merged inference {big}", "lorakit / base"): 1.01,
    ("mixed adapters {mixed0}", "lorakit mixed / single"): 1.10,
    ("mixed adapters {mixed1}", "lorakit mixed / single"): 1.10,
    ("peak training memory", "lorakit / peft"): 1.00,
}


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}×{shape[1]}"


def memory_case(setting: Setting, threads: int) -> dict:
    """Each library in its own process, so that neither sees the other's allocations."""
    peaks = {}
    for library in ("lorakit", "peft"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", library, setting.name, str(threads)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[library] = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "bytes": {lib: p["peak"] for lib, p in peaks.items()},
        "training_bytes": {lib: p["peak"] - p["before"] for lib, p in peaks.items()},
        "ratios": {
            "lorakit / peft": peaks["lorakit"]["peak"] / peaks["peft"]["peak"],
            "lorakit / peft, training only": (peaks["lorakit"]["peak"] - peaks["lorakit"]["before"])
            / (peaks["peft"]["peak"] - peaks["peft"]["before"]),
        },
    }


def run_setting(setting: Setting, device: torch.device, dtype: torch.dtype, repeats: int, threads: int) -> dict:
    base = setting.build(dtype, device)
    big, small = shape_name(setting.batch), shape_name(setting.small_batch)
    results = {}
    print(f"[{setting.name}] training step", flush=True)
    results["training step"] = cases.training_step(setting, base, device, repeats)
    print(f"[{setting.name}] inference", flush=True)
    results[f"unmerged inference {big}"] = cases.inference(setting, base, device, repeats, setting.batch, False)
    results[f"unmerged inference {small}"] = cases.inference(setting, base, device, repeats, setting.small_batch, False)
    results[f"merged inference {big}"] = cases.inference(setting, base, device, repeats, setting.batch, True)
    for shape in setting.mixed_batches:
        print(f"[{setting.name}] mixed adapters {shape_name(shape)}", flush=True)
        results[f"mixed adapters {shape_name(shape)}"] = cases.mixed_batch(setting, base, device, repeats, shape)
    print(f"[{setting.name}] peak memory", flush=True)
    results["peak training memory"] = memory_case(setting, threads)
    if setting is not REFERENCE:  # the targets are set on the reference setting only
        return {"description": setting.description, "cases": results}
    names = {"big": big, "small": small, **{f"mixed{i}": shape_name(s) for i, s in enumerate(setting.mixed_batches)}}
    for (template, ratio), target in TARGETS.items():
        try:
            case = template.format(**names)
        except KeyError:  # a setting with fewer mixed-batch shapes
            continue
        if case in results and ratio in results[case]["ratios"]:
            value = results[case]["ratios"][ratio]
            results[case].setdefault("targets", {})[ratio] = {"target": target, "met": value <= target}
    return {"description": setting.description, "cases": results}


def machine(threads: int, device: torch.device) -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": torch.get_num_threads() if threads is None else threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats: checks that the suite runs")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="which settings to run")
    parser.add_argument("--repeats", type=int, default=15, help="measured rounds per case (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="results JSON")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="summary to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = [QUICK] if args.quick else [SETTINGS[n] for n in args.settings or [REFERENCE.name, GPT2.name]]
    repeats = 3 if args.quick else args.repeats
    started = time.time()
    results = {
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": machine(args.threads, device),
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "settings": {s.name: run_setting(s, device, dtype, repeats, args.threads) for s in settings},
    }
    results["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, Path(args.markdown))
    print(f"wrote {args.out} and {args.markdown}")


if __name__ == "__main__":
    main()
