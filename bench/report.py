"""BENCHMARKS.md from results.json: one table per setting, every ratio with its target where it has one."""

from __future__ import annotations

from pathlib import Path


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms"


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{results['command']}` ({results['seconds']:.0f} s) on {m['cpu']}, {m['cores']} threads, "
        f"{m['device']}, {results['dtype']}; Python {m['python']}, torch {m['torch']}, peft {m['peft']}, "
        f"transformers {m['transformers']}. Each case runs its candidates interleaved in one process after "
        f"warm-up, {results['repeats']} rounds (calls under 50 ms repeated back to back within a sample); medians, "
        "their ratios, and each ratio's 95% bootstrap interval (rounds resampled). Peak memory: each library in "
        "its own process. Lower ratios are better.",
        "",
    ]
    for name, setting in results["settings"].items():
        lines += [
            f"## {name}",
            "",
            setting["description"],
            "",
            "| case | ratio | value | 95% interval | target | met | medians |",
            "|---|---|---|---|---|---|---|",
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
                lines.append(f"| {case} | {ratio} | {value:.3f} | {spread} | {bound} | {met} | {medians} |")
        lines.append("")
    notes = Path(__file__).with_name("NOTES.md")  # what the figures mean, kept apart so that runs keep it
    if notes.exists():
        lines.append(notes.read_text())
    path.write_text("\n".join(lines))
