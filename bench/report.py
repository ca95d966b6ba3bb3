"""BENCHMARKS.md from results.json: one table per setting, every ratio with its target where it has one."""

from __future__ import annotations

from pathlib import Path

from lorakit.io.atomic import write_text_atomic


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms"


def write_markdown(results: dict, path: Path) -> None:
    m, processes = results["machine"], results["processes"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{results['command']}` ({results['seconds']:.0f} s) on {m['cpu']} ({m['cores']} cores), "
        f"{m['threads']} threads, {m['device']}, {results['dtype']}; Python {m['python']}, torch {m['torch']}, "
        f"peft {m['peft']}, transformers {m['transformers']}. Each timed case ran in {processes} fresh "
        f"{'process' if processes == 1 else 'processes'}, {results['repeats']} rounds each, its candidates "
        "interleaved after warm-up (calls under 50 ms repeated back to back within a sample). A ratio is the median, "
        "over all rounds, of the two candidates' ratio within the round (they ran side by side); the interval is a "
        "95% bootstrap one that resamples processes and, within them, rounds; the last column has the ratio in "
        "each process on its own; medians are over all rounds. Peak memory: each library in its own process. "
        "Lower ratios are better.",
        "",
    ]
    for name, setting in results["settings"].items():
        lines += [
            f"## {name}",
            "",
            setting["description"],
            "",
            "| case | ratio | value | 95% interval | target | met | medians | per process |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case, data in setting["cases"].items():
            raw = data.get("seconds") or data.get("bytes")
            unit = _seconds if "seconds" in data else (lambda b: f"{b / 2**20:.0f} MiB")
            medians = ", ".join(f"{k} {unit(v)}" for k, v in raw.items())
            for ratio, value in data["ratios"].items():
                target = data.get("targets", {}).get(ratio)
                bound = f"≤ {target['target']:.2f}" if target else ""
                met = ("yes" if target["met"] else "NO") if target else ""
                interval = data.get("intervals", {}).get(ratio)
                spread = f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else ""
                each = " ".join(f"{r:.3f}" for r in data.get("per_process", {}).get(ratio, []))
                lines.append(f"| {case} | {ratio} | {value:.3f} | {spread} | {bound} | {met} | {medians} | {each} |")
        lines.append("")
    notes = Path(__file__).with_name("NOTES.md")  # what the figures mean, kept apart so that runs keep it
    if notes.exists():
        lines.append(notes.read_text())
    write_text_atomic(path, "\n".join(lines))
