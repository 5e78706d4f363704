"""Evaluation reports: JSON for machines, Markdown for people, PNG plots, TensorBoard scalars."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from distill.fileio import atomic_write  # noqa: E402


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def metrics_table(report: dict[str, Any]) -> str:
    """The per-w table: FD and accuracy of both models, student-vs-teacher agreement."""
    lines = ["| w | teacher FD | student FD | FD ratio | teacher acc | student acc | acc diff (pts) | PSNR s-vs-t (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for w in report["ws"]:
        t = report["models"]["teacher"]["per_w"][str(w)]
        s = report["models"]["student"]["per_w"][str(w)]
        a = report["agreement"][str(w)]
        ratio = s["fd"] / t["fd"] if t["fd"] > 0 else float("inf")
        lines.append(f"| {w:g} | {t['fd']:.3f} | {s['fd']:.3f} | {ratio:.2f} | {t['accuracy']:.3f} | "
                     f"{s['accuracy']:.3f} | {100 * (s['accuracy'] - t['accuracy']):+.1f} | {a['psnr']:.1f} |")
    return "\n".join(lines)


def speed_table(report: dict[str, Any]) -> str:
    lines = ["| model | passes/step | net evals/image | s/image | images/s |", "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        sp = m["speed"]
        lines.append(f"| {name} | {m['passes']} | {sp['network_evals_per_image']} | {sp['seconds_per_image']:.4f} | "
                     f"{sp['images_per_s']:.1f} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s = report["sampler"]
    return "\n".join([
        "# Student vs teacher",
        "",
        f"{report['num_samples']} class-balanced samples per model and w, the same noise and classes for both; "
        f"{s['kind'].upper()} with {s['num_steps']} steps, batch {s['batch_size']}. Guidance convention: "
        "`uncond + w * (cond - uncond)` (w = 0 unconditional, w = 1 conditional).",
        "",
        f"Frechet distance (FD) is measured in the features of the evaluation classifier (held-out accuracy "
        f"{report['classifier_heldout_accuracy']:.3f}) against {report['num_heldout']} held-out real images; "
        f"real-vs-real floor (two halves of the held-out set): **{report['real_vs_real_fd']:.3f}**.",
        "",
        "## Quality",
        "",
        metrics_table(report),
        "",
        "## Speed",
        "",
        speed_table(report),
        "",
        f"Speed-up of the one-pass student over the two-pass teacher at equal steps and batch: "
        f"**{report['speedup']:.2f}x**.",
        "",
    ])


def plot_metrics(report: dict[str, Any], path: Path) -> Path:
    ws = report["ws"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for name, m in report["models"].items():
        axes[0].plot(ws, [m["per_w"][str(w)]["fd"] for w in ws], marker="o", label=name)
        axes[1].plot(ws, [m["per_w"][str(w)]["accuracy"] for w in ws], marker="o", label=name)
    axes[0].axhline(report["real_vs_real_fd"], color="gray", ls="--", label="real vs real")
    axes[2].plot(ws, [report["agreement"][str(w)]["psnr"] for w in ws], marker="o", color="C2")
    for ax, title in zip(axes, ("Frechet distance (lower is better)", "class accuracy", "student vs teacher PSNR (dB)")):
        ax.set_xlabel("guidance weight w")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    return _save(fig, path)


def plot_speed(report: dict[str, Any], path: Path) -> Path:
    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, [report["models"][n]["speed"]["images_per_s"] for n in names], color=["C0", "C1"][: len(names)])
    ax.set_ylabel("images / s")
    ax.set_title(f"sampling speed (speed-up {report['speedup']:.2f}x)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def write_evaluation_report(report: dict[str, Any], out: Path, writer: Any = None) -> None:
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    plot_metrics(report, out / "metrics_vs_w.png")
    plot_speed(report, out / "speed.png")
    if writer is not None:
        for name, m in report["models"].items():
            for w in report["ws"]:
                for key in ("fd", "accuracy"):
                    writer.add_scalar(f"evaluate/{name}_{key}", m["per_w"][str(w)][key], int(round(10 * w)))
            writer.add_scalar(f"evaluate/{name}_images_per_s", m["speed"]["images_per_s"], 0)
        for w in report["ws"]:
            writer.add_scalar("evaluate/student_vs_teacher_psnr", report["agreement"][str(w)]["psnr"], int(round(10 * w)))
        writer.add_scalar("evaluate/speedup", report["speedup"], 0)
