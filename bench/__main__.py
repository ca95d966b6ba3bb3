"""`python -m bench`: run the suite, write bench/results.json and BENCHMARKS.md.

python -m bench [--quick] [--settings llama-reference gpt2-conv1d] [--processes 4] [--repeats 10] [--threads 2]
python -m bench --settings llama-reference --cases "dora training step"    # measure some cases again

With --cases, only the named timed cases run, and their results replace those cases' in the existing results
file, each recording the command that measured it; everything else in the file stays as it was.

Every timed case runs in `--processes` fresh processes (`python -m bench.cases`), taken in turns: process 1
of every case, then process 2 of every case, and so on, so that a slow spell of the machine is spread over
all cases instead of falling on one; and each process builds its candidates' models in another order, since
where a model's tensors land moves its speed too. Peak memory runs each library in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.cases import setting_cases, shape_name
from bench.models import GPT2, QUICK, REFERENCE, SETTINGS, Setting, device_and_dtype
from bench.report import write_markdown
from bench.timing import Samples, summary
from lorakit.io.atomic import write_text_atomic

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
    ("dora training step", "lorakit dora / peft dora"): 0.90,
    ("dora training step", "lorakit dora / lorakit lora"): 1.10,
}


class WorkerFailed(RuntimeError):
    pass


def worker(module: str, *args: object) -> dict:
    """Runs `python -m module args` in a fresh process and returns the JSON object on its last line."""
    command = shlex.join(["python", "-m", module, *map(str, args)])
    run = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    errors = run.stderr.strip().splitlines()
    if run.returncode != 0:
        raise WorkerFailed(f"{command} exited with {run.returncode}: {errors[-1] if errors else 'no message'}")
    try:
        result = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise WorkerFailed(f"{command} printed no JSON result") from None
    if not isinstance(result, dict):
        raise WorkerFailed(f"{command} printed no JSON object")
    return result


def memory_case(setting: Setting, threads: int) -> dict:
    """Each library in its own process, so that neither sees the other's allocations."""
    peaks = {library: worker("bench.memory", library, setting.name, threads) for library in ("lorakit", "peft")}
    return {
        "bytes": {lib: p["peak"] for lib, p in peaks.items()},
        "training_bytes": {lib: p["peak"] - p["before"] for lib, p in peaks.items()},
        "ratios": {
            "lorakit / peft": peaks["lorakit"]["peak"] / peaks["peft"]["peak"],
            "lorakit / peft, training only": (peaks["lorakit"]["peak"] - peaks["lorakit"]["before"])
            / (peaks["peft"]["peak"] - peaks["peft"]["before"]),
        },
    }


def run_setting(setting: Setting, repeats: int, processes: int, threads: int, only: list[str] | None = None) -> dict:
    """Every case of the setting, or (`only`) the timed cases named, without peak memory."""
    cases = [case for case in setting_cases(setting) if only is None or case.name in only]
    samples: dict[str, Samples] = {case.name: {} for case in cases}
    for process in range(processes):
        for case in cases:
            print(f"[{setting.name}] {case.name}: process {process + 1} of {processes}", flush=True)
            timings = worker("bench.cases", setting.name, case.name, repeats, threads, process)["samples"]
            for candidate, seconds in timings.items():
                samples[case.name].setdefault(candidate, []).append(seconds)
    results = {case.name: summary(samples[case.name], case.ratios) for case in cases}
    if only is None:
        print(f"[{setting.name}] peak memory", flush=True)
        results["peak training memory"] = memory_case(setting, threads)
    if setting is not REFERENCE:  # the targets are set on the reference setting only
        return {"description": setting.description, "cases": results}
    big, small = shape_name(setting.batch), shape_name(setting.small_batch)
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
        "cores": os.cpu_count(),
        "threads": threads,
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
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 3 rounds in one process a case: checks that the suite runs (its own settings, so not with "
        "--settings, --processes or --repeats; writes into the temporary directory unless --out and --markdown say)",
    )
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), help="which settings to run (default: the two reported)"
    )
    parser.add_argument("--processes", type=int, help="fresh processes per timed case (default 4)")
    parser.add_argument("--repeats", type=int, help="measured rounds per process (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", help="results JSON (default bench/results.json)")
    parser.add_argument("--markdown", help="summary to write (default BENCHMARKS.md)")
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="CASE",
        help="run only these timed cases of the settings and put their results into the existing results file",
    )
    args = parser.parse_args()
    if args.quick:
        given = [flag for flag in ("settings", "processes", "repeats") if getattr(args, flag) is not None]
        if given:
            parser.error(f"--quick runs its own settings: drop --{', --'.join(given)}")
        settings, repeats, processes = [QUICK], 3, 1
        default_dir = Path(tempfile.gettempdir()) / "lorakit-bench-quick"  # never over the committed results
    else:
        settings = [SETTINGS[n] for n in args.settings or [REFERENCE.name, GPT2.name]]
        repeats = 10 if args.repeats is None else args.repeats
        processes = 4 if args.processes is None else args.processes
        default_dir = None
    if repeats < 1 or processes < 1 or args.threads < 1:
        parser.error("--processes, --repeats and --threads must be positive")
    if args.cases:
        known = {case.name for setting in settings for case in setting_cases(setting)}
        unknown = [name for name in args.cases if name not in known]
        if unknown:
            where = ", ".join(s.name for s in settings)
            parser.error(f"no case {unknown[0]!r} in {where}; the cases: {', '.join(sorted(known))}")
    out = Path(args.out) if args.out else (default_dir or ROOT / "bench") / "results.json"
    markdown = Path(args.markdown) if args.markdown else (default_dir or ROOT) / "BENCHMARKS.md"
    if default_dir is not None:
        default_dir.mkdir(exist_ok=True)
    for path, flag in ((out, "--out"), (markdown, "--markdown")):  # found now, not after a run of minutes
        if path.is_dir():
            parser.error(f"{flag} {path} is a directory")
        if not path.parent.is_dir():
            parser.error(f"{flag} {path}: no directory {path.parent}")
        if not os.access(path.parent, os.W_OK):
            parser.error(f"{flag} {path}: {path.parent} is not writable")
    device, dtype = device_and_dtype()
    started = time.time()
    command = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    if args.cases and not out.is_file():
        parser.error(f"--cases puts its results into {out}, which does not exist: run the whole suite first")
    try:
        measured = {s.name: run_setting(s, repeats, processes, args.threads, args.cases) for s in settings}
    except WorkerFailed as error:
        parser.exit(1, f"python -m bench: {error}\n")
    if args.cases:
        results = json.loads(out.read_text())
        for name, setting in measured.items():
            for case, data in setting["cases"].items():
                data.update(command=command, processes=processes, repeats=repeats, threads=args.threads)
                results["settings"][name]["cases"][case] = data
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        write_markdown(results, markdown)
        print(f"wrote {out} and {markdown}")
        return
    results = {
        "command": command,
        "machine": machine(args.threads, device),  # after the workers: on CUDA it opens a context here
        "dtype": str(dtype).removeprefix("torch."),
        "processes": processes,
        "repeats": repeats,
        "settings": measured,
        "seconds": round(time.time() - started, 1),
    }
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    write_markdown(results, markdown)
    print(f"wrote {out} and {markdown}")


if __name__ == "__main__":
    main()
