"""BENCHMARKS.md from results.json: one table per setting, every ratio with its target where it has one."""

from __future__ import annotations

import json
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
        for case, data in setting["cases"].items():
            if "command" in data:  # measured again on its own (python -m bench --cases)
                lines += [
                    f"{case}: measured apart by `{data['command']}`, {data['processes']} processes of "
                    f"{data['repeats']} rounds, {data['threads']} threads.",
                    "",
                ]
    qlora = Path(__file__).with_name("qlora.json")  # `python -m bench.qlora`, run on its own
    if qlora.exists():
        lines += qlora_section(json.loads(qlora.read_text()))
    notes = Path(__file__).with_name("NOTES.md")  # what the figures mean, kept apart so that runs keep it
    if notes.exists():
        lines.append(notes.read_text())
    write_text_atomic(path, "\n".join(lines))


def qlora_section(results: dict) -> list[str]:
    """The QLoRA memory case (bench.qlora): each candidate's peak resident memory, per setting, and the ratios."""

    def gib(value: float) -> str:
        return f"{value / 2**30:.2f} GiB"

    lines = [
        "## QLoRA: peak memory of a training run, whole process",
        "",
        f"Produced by `{results['command']}`, {results['threads']} threads, torch {results['torch']}. Llama-shaped, "
        "374 M parameters from a config (hidden 1024, intermediate 2816, 24 layers, vocab 32000, untied), LoRA "
        "r = 16 on every linear layer but the output head, two AdamW steps of 1 × 256 tokens, float32 compute. "
        "Each candidate in a fresh process, one at a time; *peak* is its `ru_maxrss` (the kernel's high-water mark "
        "of its resident memory, from its imports to its last step, loading and quantizing included), *loaded* and "
        "*after steps* its resident memory at those points (/proc/self/statm). bench/qlora.py says what each "
        "candidate runs; bench/NOTES.md, what the figures are made of.",
        "",
    ]
    for name, setting in results["settings"].items():
        lines += [f"### {name}", "", "| candidate | peak | loaded | after steps | losses | load | fastest step |"]
        lines.append("|---|---|---|---|---|---|---|")
        for candidate, f in setting["candidates"].items():
            losses = " ".join(f"{loss:.3f}" for loss in f["losses"])
            lines.append(
                f"| {candidate} | {gib(f['peak'])} | {gib(f['loaded'])} | {gib(f['after_steps'])} | {losses} | "
                f"{f['load_seconds']:.0f} s | {min(f['step_seconds']):.1f} s |"
            )
        lines += ["", "| ratio of peaks | value | target | met |", "|---|---|---|---|"]
        for ratio, r in setting["ratios"].items():
            lines.append(f"| {ratio} | {r['value']:.3f} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
        lines.append("")
    return lines
