"""Reports: Markdown tables for people, PNG plots, and the evaluation report (JSON, Markdown, PNG, TensorBoard)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from distill.core.fileio import atomic_write, write_json, write_text


# ----------------------------------------------------------------------------- shared helpers
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: bool = False) -> str:
    """A Markdown table of already formatted cells (no final newline); ``right`` aligns every column right."""
    sep = "---:" if right else "---"
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + f"{sep}|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` atomically, close it."""
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- the evaluation report
def student_names(report: dict[str, Any]) -> list[str]:
    """The one-pass students of a report, in evaluation order (everything but the teacher)."""
    return [name for name in report["models"] if name != "teacher"]


def _steps(model: dict[str, Any]) -> Any:
    return model.get("steps", model.get("speed", {}).get("steps", "?"))


def _label(name: str, model: dict[str, Any]) -> str:
    steps = _steps(model)
    return name if steps == "?" else f"{name} ({steps})"


def metrics_table(report: dict[str, Any]) -> str:
    """The per-w table: one row per w and student, beside the teacher at the same w."""
    rows = []
    for w in report["ws"]:
        t = report["models"]["teacher"]["per_w"][str(w)]
        for name in student_names(report):
            s = report["models"][name]["per_w"][str(w)]
            psnr = s["psnr"] if "psnr" in s else report["agreement"][str(w)]["psnr"]  # older reports: one student
            ratio = s["fd"] / t["fd"] if t["fd"] > 0 else float("inf")
            rows.append([f"{w:g}", f"{t['fd']:.3f}", f"{s['fd']:.3f}", f"{ratio:.2f}", f"{t['accuracy']:.3f}",
                         f"{s['accuracy']:.3f}", f"{100 * (s['accuracy'] - t['accuracy']):+.1f}", f"{psnr:.1f}",
                         _label(name, report["models"][name])])
    return markdown_table([report.get("scale", "w"), "teacher FD", "student FD", "FD ratio", "teacher acc",
                           "student acc", "acc diff (pts)", "PSNR s-vs-t (dB)", "student (steps)"], rows)


def speed_table(report: dict[str, Any]) -> str:
    rows = []
    for name, m in report["models"].items():
        sp = m["speed"]
        up = f"{sp['speedup']:.2f}x" if "speedup" in sp else ""
        rows.append([name, _steps(m), m["passes"], sp["network_evals_per_image"], f"{sp['seconds_per_image']:.4f}",
                     f"{sp['images_per_s']:.1f}", up])
    return markdown_table(["model", "steps", "passes/step", "net evals/image", "s/image", "images/s",
                           "speed-up vs teacher"], rows)


def speedup_lines(report: dict[str, Any]) -> str:
    teacher = report["models"]["teacher"]
    out = []
    for name in student_names(report):
        m = report["models"][name]
        up = m.get("speed", {}).get("speedup", report.get("speedup"))
        out.append(f"- {name}: **{up:.2f}x** ({_steps(m)} one-pass steps vs the teacher's {_steps(teacher)} "
                   f"two-pass steps, same batch)")
    return "\n".join(out)


def target_lines(report: dict[str, Any]) -> list[str]:
    """A line on the students' distillation target when it is not plain CFG (their teacher is sampled that way)."""
    t = report.get("student_target") or {}
    if t.get("target", "cfg") == "cfg":
        return []
    if t["target"] == "cfgpp":
        return ["The students were distilled with `student.target=cfgpp` (two heads: the teacher's guided output at "
                "w = lambda and its unconditional output): the teacher here samples with CFG++ (two passes per step), "
                "each student with CFG++ from its one pass; the scale is CFG++'s lambda (`eval.cfgpp_lambdas`), not w.",
                ""]
    lo, hi = t["interval"]
    sampled = t.get("student_intervals") or {}  # reports from before: every student at the same w every step
    with_interval = sorted(name for name, iv in sampled.items() if iv)
    if not with_interval:
        students = "each student takes one pass at the same w every step"
    elif len(with_interval) == len(sampled):
        students = "each student takes one pass per step, its w input w inside the interval and 1 outside (as trained)"
    else:
        students = (f"each student takes one pass per step, {', '.join(with_interval)} with w input 1 outside the "
                    "interval (as trained), the others at the same w every step")
    return [f"The students were distilled with `student.target={t['target']}` (the teacher's CFG output at t in "
            f"[{lo:g}, {hi:g}], its conditional output elsewhere): the teacher here is guided only inside that "
            f"interval (the conditional pass alone outside it), {students}.", ""]


def markdown(report: dict[str, Any]) -> str:
    s = report["sampler"]
    return "\n".join([
        "# Student vs teacher",
        "",
        f"{report['num_samples']} class-balanced samples per model and {report.get('scale', 'w')}, the same noise and classes for all models; "
        f"{s['kind'].upper()}, batch {s['batch_size']}; the two-pass teacher at {_steps(report['models']['teacher'])} "
        "steps, each one-pass student at the steps in brackets. Guidance convention: "
        "`uncond + w * (cond - uncond)` (w = 0 unconditional, w = 1 conditional).",
        "",
    ] + target_lines(report) + [
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
        "Speed-up of each one-pass student over the two-pass teacher (wall time per image, measured in this run):",
        "",
        speedup_lines(report),
        "",
    ] + method_lines(report) + negative_lines(report))


METHOD_NAMES = {"cfg": "CFG", "cfgpp": "CFG++", "interval": "CFG, guidance interval", "classifier": "classifier guidance"}


def method_calls(m: dict[str, Any]) -> str:
    """Network calls per image, plus the noise-aware classifier's forward+backward passes where it guides."""
    clf = m.get("classifier_calls_per_image", 0)
    return f"{m['network_calls_per_image']}" + (f" + {clf} classifier fwd+bwd" if clf else "")


def method_lines(report: dict[str, Any]) -> list[str]:
    """The guidance-methods section: the teacher under each method and scale, on the same noise and classes."""
    section = report.get("methods")
    if not section:
        return []
    rows = []
    for method, m in section["methods"].items():
        name = METHOD_NAMES.get(method, method)
        if m.get("interval"):
            name += f" t in [{m['interval'][0]:g}, {m['interval'][1]:g}]"
        for scale in m["scales"]:
            r = m["per_scale"][str(scale)]
            rows.append([name, f"{m['scale']} = {scale:g}", f"{r['fd']:.3f}", f"{r['accuracy']:.3f}", method_calls(m)])
    return [
        "## Guidance methods (teacher)",
        "",
        "The two-pass teacher on the evaluation's noise and classes under each guidance method: CFG "
        "(`uncond + w * (cond - uncond)`), CFG++ (x0 from `uncond + lambda * (cond - uncond)`, re-noised with the "
        "unconditional noise), CFG guided only at the steps whose time t lies in the interval (one conditional "
        "pass elsewhere) and classifier guidance (the unconditional teacher, one pass per step, its eps moved by "
        "`- s * sigma_t * grad log p(y | z_t, t)` of the noise-aware classifier). Calls per image: UNet passes, "
        "plus one forward and one backward pass of the small classifier per step for classifier guidance. "
        "Trade-off plot: `methods_tradeoff.png`.",
        "",
        markdown_table(["method", "scale", "FD", "accuracy", "net calls/image"], rows),
        "",
    ]


def plot_methods(report: dict[str, Any], path: Path) -> Path:
    """Accuracy (x) against FD (y), one curve per guidance method, each point a scale."""
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    for method, m in report["methods"]["methods"].items():
        points = [m["per_scale"][str(s)] for s in m["scales"]]
        ax.plot([p["accuracy"] for p in points], [p["fd"] for p in points], marker="o",
                label=f"{METHOD_NAMES.get(method, method)} ({method_calls(m)} calls/image)")
        for s, p in zip(m["scales"], points):
            ax.annotate(f"{s:g}", (p["accuracy"], p["fd"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axhline(report["real_vs_real_fd"], color="gray", ls="--", label="real vs real")
    ax.set_xlabel("class accuracy")
    ax.set_ylabel("Frechet distance (lower is better)")
    ax.set_title("guidance methods of the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def negative_lines(report: dict[str, Any]) -> list[str]:
    """The negative-class section of the report: each model guided away from a negative class vs with the null class."""
    neg = report.get("negative")
    if not neg:
        return []
    names = list(neg["models"])
    rows = []
    for w in report["ws"]:
        for name in names:
            m = neg["models"][name]["per_w"][str(w)]
            ratio = (f"{m['fd_ratio']:.2f}", f"{m['negative_probability_ratio']:.2f}") if "fd_ratio" in m else ("", "")
            rows.append([f"{w:g}", _label(name, report["models"][name]), f"{m['negative']['fd']:.2f}", ratio[0],
                         f"{m['negative']['accuracy']:.3f}", f"{m['null']['accuracy']:.3f}",
                         f"{m['negative']['negative_probability']:.4f}", f"{m['null']['negative_probability']:.4f}",
                         ratio[1], f"{m['push']:.2f}" if "push" in m else ""])
    pairs = ", ".join(f"{y} not {k}" for y, k in neg["pairs"])
    b = neg["bars"]
    verdicts = [f"- {_label(n, report['models'][n])}: "
                f"{'within' if neg['models'][n]['within_bars'] else 'OUTSIDE'} the bars (FD ratio <= {b['fd_ratio']:g}, "
                f"P(neg) within {100 * b['negative_probability_rel']:g}% of the teacher's, at every w <= {b['max_w']:g})"
                f"{_outside(neg['models'][n].get('outside_bars') or {})}" for n in names[1:]]
    return [
        "## Negative classes",
        "",
        f"Pairs (target not negative): {pairs}; {neg['samples_per_pair']} samples per pair, model and w, each drawn "
        "from the same noise twice: guided away from the negative class (`out(neg) + w * (out(y) - out(neg))`; the "
        "teacher in two passes, each student in one) and with the null class. FD against the held-out images of the "
        "target classes; P(neg): the evaluation classifier's mean probability of the negative class; push: how far "
        "guiding away lowered the mean log P(neg) against the null-class samples, in nats (it still shows where "
        "both probabilities are near zero; negative below w = 1, where the formula pulls towards the class).",
        "",
        markdown_table(["w", "model", "FD (neg)", "FD / teacher", "acc (neg)", "acc (null)", "P(neg) (neg)",
                        "P(neg) (null)", "P(neg) / teacher", "push (nats)"], rows),
        "",
        *verdicts,
        "",
    ]


def _outside(failed: dict[str, list[float]]) -> str:
    """``: FD ratio at w = 3; P(neg) at w = 1, 2`` for the bars a student misses (empty when none)."""
    names = {"fd_ratio": "FD ratio", "negative_probability_ratio": "P(neg)"}
    parts = [f"{names[k]} at w = {', '.join(f'{w:g}' for w in ws)}" for k, ws in failed.items() if ws]
    return f": outside for {'; '.join(parts)}" if parts else ""


def plot_metrics(report: dict[str, Any], path: Path) -> Path:
    ws = report["ws"]
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.5))
    for name, m in report["models"].items():
        axes[0].plot(ws, [m["per_w"][str(w)]["fd"] for w in ws], marker="o", label=name)
        axes[1].plot(ws, [m["per_w"][str(w)]["accuracy"] for w in ws], marker="o", label=name)
        if name != "teacher":
            axes[2].plot(ws, [m["per_w"][str(w)]["psnr"] for w in ws], marker="o", label=name)
    axes[0].axhline(report["real_vs_real_fd"], color="gray", ls="--", label="real vs real")
    for ax, title in zip(axes, ("Frechet distance (lower is better)", "class accuracy", "student vs teacher PSNR (dB)")):
        ax.set_xlabel("CFG++ lambda" if report.get("scale") == "lambda" else "guidance weight w")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_speed(report: dict[str, Any], path: Path) -> Path:
    names = list(report["models"])
    fig, ax = pyplot().subplots(figsize=(max(5, 1.2 * len(names)), 3.5))
    ax.bar([f"{n}\n{_steps(report['models'][n])} steps" for n in names],
           [report["models"][n]["speed"]["images_per_s"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.set_ylabel("images / s")
    ax.set_title("sampling speed (same batch)")
    return save_figure(fig, path)


def write_evaluation_report(report: dict[str, Any], out: Path, writer: Any = None) -> None:
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    plot_metrics(report, out / "metrics_vs_w.png")
    plot_speed(report, out / "speed.png")
    if report.get("methods"):
        plot_methods(report, out / "methods_tradeoff.png")
    if writer is not None:
        for name, m in report["models"].items():
            for w in report["ws"]:
                for key in ("fd", "accuracy"):
                    writer.add_scalar(f"evaluate/{name}_{key}", m["per_w"][str(w)][key], int(round(10 * w)))
                if name != "teacher":
                    writer.add_scalar(f"evaluate/{name}_vs_teacher_psnr", m["per_w"][str(w)]["psnr"], int(round(10 * w)))
            writer.add_scalar(f"evaluate/{name}_images_per_s", m["speed"]["images_per_s"], 0)
        writer.add_scalar("evaluate/speedup", report["speedup"], 0)
