"""The bench's report: the Markdown table, the plot and the TensorBoard scalars of ``bench.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distill.core.report import pyplot, save_figure


def other_cpu(machine: dict[str, Any]) -> str:
    """"; other processes kept N cores busy ..." for the report's machine line where that was measured, else ""."""
    others = machine.get("other_cores")
    return "" if others is None else f"; other processes kept {others:.2f} cores busy on average while the timings ran"


def markdown_report(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    flops = {x["name"]: x["forward_flops_per_image"] for x in report["models"]}
    peaks = "; ".join(f"{t} threads: numpy {p['numpy_matmul']:.0f} GFLOP/s, MindSpore {p['mindspore_matmul']:.0f} GFLOP/s"
                      for t, p in report["peak_gflops_by_threads"].items())
    lines = ["# Sampling speed: two-pass CFG teacher, one-pass student, few-step student\n",
             f"{m['device']} / {m['platform']} / {m['cpu_count']} CPUs / MindSpore {m['mindspore']} / oneDNN ISA cap "
             f"{m['onednn_max_cpu_isa']}; load average {m['load_average_1_5_15']} before, {m['load_average_after']} "
             f"after{other_cpu(m)}. Medians of {o['repeats']} interleaved runs after {o['warmup']} warm-up runs (quartiles in "
             f"brackets; all repeats in bench.json); compile = first call minus a warm call. Threads: MindSpore's "
             f"CPU kernel threads (`cpu_threads`; default = MindSpore's own), one process per thread count.\n",
             "Forward pass per image: " + ", ".join(f"{k} {v / 1e6:.1f} MFLOP" for k, v in flops.items())
             + f". Peak of a {o['peak_matmul_size']}^2 fp32 matmul in this run ({peaks}).\n"]
    if report.get("busy_warning"):
        lines.append(f"**Warning: {report['busy_warning']}.**\n")
    lines += ["| batch | threads | model | engine | steps | ms/step | images/s | GFLOP/s | % numpy peak | compile s |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        for e in r["entries"]:
            ms_ = e["ms_per_step"]
            comp = "" if e["compile_seconds"] is None else f"{e['compile_seconds']:.1f}"
            lines.append(f"| {r['batch']} | {r['cpu_threads']} | {e['model']} | {e['engine']} | {e['steps']} | "
                         f"{ms_['median']:.2f} [{ms_['q25']:.2f}-{ms_['q75']:.2f}] | {e['images_per_s']['median']:.1f} | "
                         f"{e['gflops']:.1f} | {e['pct_of_numpy_matmul']:.1f} | {comp} |")
    lines += ["", "Speed-ups (slower / faster sampler call; limit in brackets where one exists):", ""]
    lines += _ratio_table(report["results"], lambda r: f"{r['batch']} | {r['cpu_threads']}", "batch | threads")
    if report.get("best_threads"):
        lines += ["", "Each entry at its fastest thread count per batch size (set `cpu_threads` to match):", ""]
        lines += _ratio_table(report["best_threads"], lambda r: str(r["batch"]), "batch")
        lines += ["", "Fastest thread count per batch size: " + "; ".join(
            f"batch {r['batch']}: " + ", ".join(f"{k} {t}" for k, t in r["threads"].items()) for r in report["best_threads"])]
    return "\n".join(lines) + "\n"


def _ratio_table(rows: list[dict[str, Any]], head: Any, title: str) -> list[str]:
    names = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
    out = ["| " + title + " | " + " | ".join(n.replace("_", " ") for n in names) + " |",
           "|" + "---:|" * (title.count("|") + 1) + "---:|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            x = r["ratios"].get(n)
            cells.append("" if x is None else f"{x['median_ratio']:.2f}x" + (f" ({x['limit']:g})" if x["limit"] else ""))
        out.append(f"| {head(r)} | " + " | ".join(cells) + " |")
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    rows = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = list(dict.fromkeys((e["model"], e["engine"], e["steps"], r["cpu_threads"]) for r in rows for e in r["entries"]))
    for model, engine, steps, threads in keys:
        pts = [(r["batch"], e["images_per_s"]["median"]) for r in rows if r["cpu_threads"] == threads
               for e in r["entries"] if (e["model"], e["engine"], e["steps"]) == (model, engine, steps)]
        ax1.plot(*zip(*pts), ("o" if engine == "eager" else "s") + ("--" if threads == "1" else "-"),
                 label=f"{model} {engine} {steps} steps, {threads} threads")
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title="Throughput")
    ax1.legend(fontsize=6)
    best = report.get("best_threads") or rows
    batches = [r["batch"] for r in best]
    names = list(dict.fromkeys(k for r in best for k in r["ratios"]))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = [r["ratios"].get(name, {}).get("median_ratio", np.nan) for r in best]
        ax2.bar(np.arange(len(batches)) + (k - (len(names) - 1) / 2) * width, vals, width, label=name.replace("_", " "))
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xticks=np.arange(len(batches)), xticklabels=[str(b) for b in batches], xlabel="batch size",
            ylabel="speed-up", title="Speed-ups" + (" (each entry at its fastest thread count)"
                                                   if report.get("best_threads") else ""))
    ax2.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def write_tensorboard(report: dict[str, Any], tb_dir: Path) -> None:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for r in report["results"]:  # x axis = batch size, one curve per entry and ratio (and thread count)
        tag = "" if r["cpu_threads"] == "default" else f"_threads{r['cpu_threads']}"
        for e in r["entries"]:
            for key in ("images_per_s", "ms_per_step"):
                writer.add_scalar(f"bench/{key}/{e['model']}_{e['engine']}_steps{e['steps']}{tag}", e[key]["median"],
                                  r["batch"])
        for name, x in r["ratios"].items():
            writer.add_scalar(f"bench/speedup/{name}{tag}", x["median_ratio"], r["batch"])
    writer.close()
