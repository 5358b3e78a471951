"""docs/benchmarks.md: each benchmark rewrites its own generated section, between markers, and nothing else.

The hand-written analysis around the sections stays as it is. The section holds what a person reads (the command,
the machine, the table); the whole result goes to ``bench/results/<section>.json`` beside it, committed with the
page (it used to be pasted into the page: 77 % of its 3,000 lines).
"""

from __future__ import annotations

import json
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS = Path(__file__).resolve().parent / "results"


def _machine(m: dict) -> str:
    flags = ", ".join(m.get("cpu_flags", [])) or "?"
    return (f"{m.get('cpu', '?')}, {m.get('cpus')} CPUs ({flags}), {m.get('memory_gib')} GiB; torch {m.get('torch')} "
            f"({m.get('torch_threads')} threads, {m.get('torch_cpu_capability')}), Pillow {m.get('pillow')}, "
            f"Python {m.get('python')}; load average at start {m.get('load_average')}")


def throughput_markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {_machine(r['machine'])}; at the end {r['machine_after']['load_average']}  ",
        f"Model: {r['model']}; batch size {r['batch_size']}, {r['workers']} workers on both sides; "
        f"{r['rounds']} rounds, alternating.  ",
    ]
    if r["comparisons"] and "tagger-torch" in r["comparisons"][0]["runs"]:
        runtime = r["comparisons"][0].get("runtime") or {}
        lines.append(f"Baseline transform (timm's eval transform): `{r['comparisons'][0].get('transform')}`  ")
        lines.append(f"`tagger` = the job as shipped, `--runtime auto`, which chose **{runtime.get('name')}** "
                     f"({runtime.get('precision')}; {runtime.get('reason')}); `tagger --runtime torch` = the same job on PyTorch.")
        lines += ["", "| catalog | images | mean file | tagger img/s (runs) | tagger --runtime torch img/s (runs) | baseline img/s (runs) | "
                      "tagger vs torch (median) | tagger vs baseline (median) | CPU ms/img tagger / torch / baseline | peak PSS tagger / torch / baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["comparisons"]:
            runs = {v: ", ".join(f"{x['images_per_s']:.2f}" for x in rs) for v, rs in c["runs"].items()}
            size = "1800x2400" if c["catalog"] == "large" else "225x300"
            med, cpu, pss = c["median_images_per_s"], c["median_cpu_ms_per_image"], c["peak_pss_mib"]
            lines.append(
                f"| {c['catalog']} ({size}) | {c['images']} | {c['mean_file_kb']:.0f} KB | **{med['tagger']:.2f}** ({runs['tagger']}) | "
                f"{med['tagger-torch']:.2f} ({runs['tagger-torch']}) | {med['baseline']:.2f} ({runs['baseline']}) | "
                f"**{c['ratio_vs_torch_median']:.2f}x** ({', '.join(f'{x:.2f}' for x in c['ratio_vs_torch_per_round'])}) | "
                f"**{c['ratio_median']:.2f}x** | {cpu['tagger']:.0f} / {cpu['tagger-torch']:.0f} / {cpu['baseline']:.0f} | "
                f"{pss['tagger']:.0f} / {pss['tagger-torch']:.0f} / {pss['baseline']:.0f} MiB |"
            )
    elif r["comparisons"]:  # results from before --runtime: two sides
        lines.append(f"Baseline transform (timm's eval transform): `{r['comparisons'][0].get('transform')}`")
        lines += ["", "| catalog | images | mean file | tagger img/s (runs) | baseline img/s (runs) | ratio per round | ratio (median) | CPU ms/img tagger / baseline (ratio) | peak RSS tagger / baseline | peak PSS tagger / baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["comparisons"]:
            runs = {v: ", ".join(f"{x['images_per_s']:.2f}" for x in rs) for v, rs in c["runs"].items()}
            size = "1800x2400" if c["catalog"] == "large" else "225x300"
            lines.append(
                f"| {c['catalog']} ({size}) | {c['images']} | {c['mean_file_kb']:.0f} KB | "
                f"**{c['median_images_per_s']['tagger']:.2f}** ({runs['tagger']}) | "
                f"{c['median_images_per_s']['baseline']:.2f} ({runs['baseline']}) | "
                f"{', '.join(f'{x:.2f}x' for x in c['ratio_per_round'])} | **{c['ratio_median']:.2f}x** | "
                f"{c['median_cpu_ms_per_image']['tagger']:.0f} / {c['median_cpu_ms_per_image']['baseline']:.0f} ({c['cpu_ratio']:.2f}x) | "
                f"{c['peak_rss_mib']['tagger']:.0f} / {c['peak_rss_mib']['baseline']:.0f} MiB | "
                f"{c['peak_pss_mib']['tagger']:.0f} / {c['peak_pss_mib']['baseline']:.0f} MiB |"
            )
    against = [c for c in r["comparisons"] if c.get("against")]
    if against:
        side = against[0]["against"]
        lines += ["", f"`{side}` = the same job as it was at that revision (its own source, this venv), in the same rounds:", "",
                  f"| catalog | tagger img/s (runs) | {side} img/s (runs) | tagger vs {side} per round | median | CPU ms/img tagger / {side} |",
                  "|---|---|---|---|---|---|"]
        for c in against:
            runs = {v: ", ".join(f"{x['images_per_s']:.2f}" for x in rs) for v, rs in c["runs"].items()}
            med, cpu = c["median_images_per_s"], c["median_cpu_ms_per_image"]
            lines.append(f"| {c['catalog']} | {med['tagger']:.2f} ({runs['tagger']}) | {med[side]:.2f} ({runs[side]}) | "
                         f"{', '.join(f'{x:.2f}x' for x in c['ratio_vs_against_per_round'])} | **{c['ratio_vs_against_median']:.2f}x** | "
                         f"{cpu['tagger']:.0f} / {cpu[side]:.0f} |")
    return "\n".join(lines)


def levers_markdown(r: dict) -> str:
    study = r["lever_study"]
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {_machine(r['machine'])}; at the end {r['machine_after']['load_average']}  ",
        f"Large catalog (1800x2400), {study['images']} images, {r['model']}, batch size {r['batch_size']}, "
        f"{r['workers']} workers; each lever against the job as shipped, {r['rounds']} rounds (order reversed every other round).",
        "", "| lever | img/s (median) | runs | vs as shipped | CPU ms/img | peak PSS |", "|---|---|---|---|---|---|",
    ]
    for name, row in study["levers"].items():
        lines.append(f"| {name} | {row['median_images_per_s']:.2f} | {', '.join(f'{x:.2f}' for x in row['runs'])} | "
                     f"{row['vs_shipped']:.2f}x | {row.get('cpu_ms_per_image', float('nan')):.0f} | {row['peak_pss_mib']:.0f} MiB |")
    return "\n".join(lines)


def update_section(name: str, markdown: str, results: dict, module: str | None = None) -> None:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    module = module or ("memory" if name == "memory" else "run")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    body = (f"{begin}\n<!-- generated by python -m bench.{module}; edits here are overwritten -->\n"
            f"{markdown}\n\nRaw results: `bench/results/{name}.json` (written by the same command).\n{end}")
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{body}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
