"""``task=bench``: one-pass student vs two-pass teacher sampling speed, in one process.

For every (batch, steps) the two models run interleaved (alternating who goes first), on
the same noise and labels, after an untimed jit warm-up per compiled shape. Each timed
run is one full :func:`distill.sampling.sample` call. :func:`summarize` holds the math.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core.fileio import write_json, write_text
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.report import markdown_table, pyplot, save_figure
from distill.core.sampling import jit_predictor, sample

log = logging.getLogger(__name__)
MODELS = ("teacher", "student")


# ----------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, quartiles, IQR) of a list of numbers."""
    v = np.asarray(values, np.float64)
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "min": float(v.min()), "max": float(v.max()),
            "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def summarize(seconds: Sequence[float], batch: int, steps: int) -> dict[str, dict[str, float]]:
    """Per-run wall times of ``sample`` (``batch`` images, ``steps`` steps) -> per-image / per-step stats."""
    t = np.asarray(seconds, np.float64)
    if t.size == 0 or np.any(t <= 0) or batch < 1 or steps < 1:
        raise ValueError("summarize needs positive timings, batch and steps")
    return {"seconds_per_image": spread(t / batch), "images_per_s": spread(batch / t),
            "ms_per_step": spread(1000.0 * t / steps)}


def speedup(teacher_seconds: Sequence[float], student_seconds: Sequence[float]) -> dict[str, Any]:
    """teacher time / student time: ratio of medians, and the spread of the per-repeat (paired) ratios."""
    t, s = np.asarray(teacher_seconds, np.float64), np.asarray(student_seconds, np.float64)
    return {"median_ratio": float(np.median(t) / np.median(s)), "paired": spread(t / s)}


# ----------------------------------------------------------------------------- config
def _positive_ints(value: Any, name: str) -> list[int]:
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not items:
        raise UserError(f"bench: {name} must be a non-empty list of positive integers, got {value}")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"bench: {name} must be a non-empty list of positive integers, got {list(items)}")
    return list(dict.fromkeys(int(v) for v in items))  # in order, duplicates dropped


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"bench: {name} must be an integer >= {minimum}, got {value}")
    return int(value)


def bench_options(b: Any) -> dict[str, Any]:
    teacher_steps = b.get("teacher_steps")
    return {"batch_sizes": _positive_ints(b.get("batch_sizes"), "batch_sizes"),
            "step_counts": _positive_ints(b.get("step_counts"), "step_counts"),
            "repeats": _positive_int(b.get("repeats"), "repeats"),
            "warmup": _positive_int(b.get("warmup"), "warmup", 0),
            "teacher_steps": None if teacher_steps is None else _positive_int(teacher_steps, "teacher_steps")}


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    import mindspore

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "mindspore": mindspore.__version__, "device": device,
            "load_average_1_5_15": load_average()}


# ----------------------------------------------------------------------------- timing
def run_bench(cfg: DictConfig) -> Path:
    from tqdm import tqdm
    from student.loading import load_student
    from teacher.guidance import ConditionalPrediction, GuidedPrediction
    from teacher.loading import load_teacher
    from distill.jobs.common import uncond_labels

    opts = bench_options(cfg.bench)
    data = load_data(cfg.data)
    student_path = Path(str(cfg.bench.student)).expanduser() if cfg.bench.get("student") else None
    student_net, student_meta = load_student(cfg, data, student_path)
    cells = {"teacher": GuidedPrediction(load_teacher(cfg, data)), "student": ConditionalPrediction(student_net)}
    predictors = {m: jit_predictor(c, bool(cfg.jit)) for m, c in cells.items()}
    w, seed, nc = float(cfg.sampler.w), int(cfg.seed), data.num_classes
    machine = machine_info(str(cfg.device))

    def steps_of(model: str, steps: int) -> int:
        return opts["teacher_steps"] if model == "teacher" and opts["teacher_steps"] else steps

    configs = [(b, s) for b in opts["batch_sizes"] for s in opts["step_counts"]]
    bar = tqdm(total=len(configs) * opts["repeats"] * 2, desc="bench", unit="run", dynamic_ncols=True)
    warmed: set[tuple[str, int]] = set()
    results = []
    for batch, steps in configs:
        noise = np.random.default_rng((seed, batch)).standard_normal((batch, *data.image_shape)).astype(np.float32)
        labels = (np.arange(batch) % nc).astype(np.int32)
        y_unc = uncond_labels(cfg, batch, nc)

        def run(model: str, n_steps: int) -> float:
            settings = build.sampler_settings(cfg, n_steps)
            t0 = time.perf_counter()
            sample(predictors[model], noise, labels, w, settings, y_unc, seed=seed)
            return time.perf_counter() - t0

        for model in MODELS:  # one untimed sample of `warmup` steps per compiled shape (min 2: a DDIM step too)
            if (model, batch) not in warmed:
                bar.set_postfix_str(f"warm-up {model} batch {batch}")
                run(model, max(2, opts["warmup"]))
                warmed.add((model, batch))
        times: dict[str, list[float]] = {m: [] for m in MODELS}
        for r in range(opts["repeats"]):
            for model in (MODELS if r % 2 == 0 else MODELS[::-1]):
                bar.set_postfix_str(f"batch {batch} steps {steps} {model}")
                times[model].append(run(model, steps_of(model, steps)))
                bar.update(1)
        row: dict[str, Any] = {"batch": batch, "steps": steps}
        for model in MODELS:
            n = steps_of(model, steps)
            row[model] = {"steps": n, "evals_per_step": int(cells[model].passes),
                          "evals_per_image": int(cells[model].passes) * n,
                          "seconds": times[model], **summarize(times[model], batch, n)}
        row["speedup"] = speedup(times["teacher"], times["student"])
        results.append(row)
    bar.close()
    machine["load_average_after"] = load_average()

    report = {"machine": machine, "options": opts, "w": w, "seed": seed, "jit": bool(cfg.jit),
              "image_shape": list(data.image_shape), "student_checkpoint": str(student_path or "run's student"),
              "student_kind": student_meta.get("kind"), "speedup_definition": "teacher seconds / student seconds",
              "results": results}
    out = build.run_dir(cfg) / "bench"
    table = bench_markdown(report)
    write_json(out / "bench.json", report)
    write_text(out / "bench.md", table)
    plot(report, out / "bench.png")
    write_tensorboard(report, build.run_dir(cfg) / "tb")
    print(table)
    return out / "bench.json"


# ----------------------------------------------------------------------------- reports
def bench_markdown(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    rows = []
    for r in report["results"]:
        t, s = r["teacher"], r["student"]
        steps = str(r["steps"]) if t["steps"] == s["steps"] else f"{s['steps']} (teacher {t['steps']})"
        rows.append([r["batch"], steps, f"{t['ms_per_step']['median']:.2f}", f"{s['ms_per_step']['median']:.2f}",
                     f"{t['images_per_s']['median']:.1f}", f"{s['images_per_s']['median']:.1f}",
                     f"{r['speedup']['median_ratio']:.2f}x"])
    table = markdown_table(["batch", "steps", "teacher ms/step", "student ms/step", "teacher img/s", "student img/s",
                            "speed-up"], rows, right=True)
    return "\n".join(["# Sampling speed: one-pass student vs two-pass CFG teacher\n",
                      f"{m['device']} / {m['platform']} / {m['cpu_count']} CPUs / MindSpore {m['mindspore']}; "
                      f"load average {m['load_average_1_5_15']} before, {m['load_average_after']} after. "
                      f"Medians of {o['repeats']} interleaved runs (spread in bench.json); speed-up = teacher time / "
                      f"student time per image.\n", table]) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    rows, step_counts = report["results"], report["options"]["step_counts"]
    batches = report["options"]["batch_sizes"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for steps in step_counts:
        sel = [r for r in rows if r["steps"] == steps]
        for model, style in (("teacher", "o--"), ("student", "s-")):
            ax1.plot([r["batch"] for r in sel], [r[model]["images_per_s"]["median"] for r in sel], style,
                     label=f"{model} ({sel[0][model]['evals_per_step']} pass), {steps} steps")
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title="Throughput")
    ax1.legend(fontsize=8)
    width = 0.8 / len(step_counts)
    for k, steps in enumerate(step_counts):
        vals = [next(r["speedup"]["median_ratio"] for r in rows if r["batch"] == b and r["steps"] == steps)
                for b in batches]
        ax2.bar(np.arange(len(batches)) + (k - (len(step_counts) - 1) / 2) * width, vals, width, label=f"{steps} steps")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xticks=np.arange(len(batches)), xticklabels=[str(b) for b in batches], xlabel="batch size",
            ylabel="teacher time / student time", title="Speed-up of the one-pass student")
    ax2.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def write_tensorboard(report: dict[str, Any], tb_dir: Path) -> None:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for r in report["results"]:  # x axis = batch size, one curve per model and step count
        for model in MODELS:
            for key in ("images_per_s", "ms_per_step"):
                writer.add_scalar(f"bench/{key}/{model}_steps{r['steps']}", r[model][key]["median"], r["batch"])
        writer.add_scalar(f"bench/speedup/steps{r['steps']}", r["speedup"]["median_ratio"], r["batch"])
    writer.close()
