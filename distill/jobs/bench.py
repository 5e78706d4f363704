"""``task=bench``: sampling speed of the two-pass teacher, the one-pass student and the few-step
student, with the compiled engine against the eager reference, in one process.

For each batch size every entry (a model at a step count with an engine) is warmed up (its first
call, i.e. the compile, is timed apart), then all entries run interleaved, the order rotating per
repeat, so machine noise hits them alike. Each timed run is one full :func:`sample` call on the same
noise and labels. The FLOPs of one forward pass are counted from the network's layers, and a large
matmul timed in the same process gives the machine's peak for the percentages.
:func:`summarize`, :func:`speedup` and :func:`flop_rate` hold the math.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import write_json, write_text
from distill.core.report import pyplot, save_figure
from distill.core.runtime import current
from distill.core.sampling import Predictor, SamplerSettings, jit_predictor, sample

log = logging.getLogger(__name__)
GRID_MODELS = ("teacher", "student")  # timed at every grid step count; may also run eager


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


def speedup(slow_seconds: Sequence[float], fast_seconds: Sequence[float]) -> dict[str, Any]:
    """slow time / fast time: ratio of medians, and the spread of the per-repeat (paired) ratios."""
    t, s = np.asarray(slow_seconds, np.float64), np.asarray(fast_seconds, np.float64)
    return {"median_ratio": float(np.median(t) / np.median(s)), "paired": spread(t / s)}


def flop_rate(flops_per_eval: float, evals_per_image: int, batch: int, seconds: float,
              peaks: dict[str, float]) -> dict[str, float]:
    """Achieved GFLOP/s of a sampler run and its percentage of each measured peak (GFLOP/s)."""
    gflops = flops_per_eval * evals_per_image * batch / seconds / 1e9
    return {"gflops": gflops, **{f"pct_of_{k}": 100.0 * gflops / v for k, v in peaks.items()}}


# ----------------------------------------------------------------------------- FLOPs and peak
def forward_flops(net: Any, image_shape: tuple[int, ...], num_classes: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one forward pass of ``net`` on ONE image, by layer type.

    Counted from the layers a forward pass runs (forward hooks): convolutions, dense layers and
    the attention matmuls; normalisation and element-wise ops are left out (a few percent).
    """
    import mindspore as ms
    from mindspore import nn
    from teacher.unet import Attention

    counts: dict[str, float] = {"conv": 0.0, "dense": 0.0, "attention": 0.0}

    def hook(cell: Any, inputs: Any, output: Any) -> None:
        if isinstance(cell, nn.Conv2d):
            kh, kw = cell.kernel_size
            counts["conv"] += 2.0 * np.prod(output.shape) * (cell.in_channels // cell.group) * kh * kw
        elif isinstance(cell, nn.Dense):
            counts["dense"] += 2.0 * np.prod(output.shape) * cell.in_channels
        elif isinstance(cell, Attention):
            b, c, h, w = inputs[0].shape
            counts["attention"] += 2.0 * 2 * b * (h * w) ** 2 * c  # q^T k and v attn^T

    handles = [c.register_forward_hook(hook) for _, c in net.cells_and_names()
               if isinstance(c, (nn.Conv2d, nn.Dense, Attention))]
    try:
        x = ms.Tensor(np.zeros((1, *image_shape), np.float32))
        y = ms.Tensor(np.array([num_classes - 1], np.int32))
        one = ms.Tensor(np.ones(1, np.float32))
        net(x, one * 0.5, y, one)
    finally:
        for h in handles:
            h.remove()
    return {**counts, "total": float(sum(counts.values()))}


def matmul_peak(n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n fp32 matmul, best of ``repeats``: numpy's BLAS and MindSpore's matmul."""
    import mindspore as ms
    from mindspore import ops

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ta = ms.Tensor(a)
    runs = {"numpy_matmul": lambda: a @ a, "mindspore_matmul": lambda: ops.matmul(ta, ta).asnumpy()}
    out = {}
    for name, fn in runs.items():
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = 2.0 * n**3 / best / 1e9
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    opts = {"batch_sizes": _positive_ints(b.get("batch_sizes"), "batch_sizes"),
            "step_counts": _positive_ints(b.get("step_counts"), "step_counts"),
            "repeats": _positive_int(b.get("repeats"), "repeats"),
            "warmup": _positive_int(b.get("warmup"), "warmup", 0),
            "reference_steps": (None if b.get("reference_steps") is None
                                else _positive_int(b.get("reference_steps"), "reference_steps")),
            "eager_models": [str(m) for m in (b.get("eager_models") or [])],
            "peak_matmul_size": _positive_int(b.get("peak_matmul_size", 1024), "peak_matmul_size", 64),
            "single_thread_max_batch": (None if b.get("single_thread_max_batch") is None
                                        else _positive_int(b.get("single_thread_max_batch"), "single_thread_max_batch"))}
    engine = str(b.get("engine") or "step")
    if engine not in ("step", "loop"):
        raise UserError(f"bench: engine '{engine}' must be a compiled engine (step or loop)")
    opts["engine"] = engine
    unknown = sorted(set(opts["eager_models"]) - set(GRID_MODELS))
    if unknown:
        raise UserError(f"bench: eager_models {unknown} must be among {list(GRID_MODELS)}")
    if opts["reference_steps"] is None:
        opts["reference_steps"] = max(opts["step_counts"])
    if opts["reference_steps"] not in opts["step_counts"]:
        raise UserError(f"bench: reference_steps {opts['reference_steps']} must be one of step_counts {opts['step_counts']}")
    return opts


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    import mindspore

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "mindspore": mindspore.__version__, "device": device,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "load_average_1_5_15": load_average()}


def busy_warning(machine: dict[str, Any]) -> Optional[str]:
    """A warning when the 1-minute load average before or after exceeded the core count."""
    cores = machine.get("cpu_count") or 1
    loads = [la[0] for la in (machine.get("load_average_1_5_15"), machine.get("load_average_after")) if la]
    if loads and max(loads) > cores:
        return (f"the machine was busy (1-minute load average up to {max(loads):.1f} on {cores} cores): "
                f"absolute timings are pessimistic, ratios of interleaved runs less so")
    return None


# ----------------------------------------------------------------------------- models
@dataclass
class BenchModel:
    """One model the bench times: its prediction cell and, for a few-step student, its own step count."""

    name: str
    predictor: Predictor
    passes: int
    flops_per_image: float       # one forward pass of the backbone, per image
    checkpoint: str
    steps: Optional[int] = None  # None: the grid's step counts


def bench_checkpoints(cfg: DictConfig, data: ImageData) -> list[tuple[str, Path, Optional[int]]]:
    """(name, checkpoint, own step count or None) of the models to time: the teacher, the student and
    (when <run>/progressive holds rounds) the last round, checked to descend from the run's student."""
    from student.loading import student_checkpoint_path
    from student.progressive import progressive_dir, verified_rounds
    from teacher.loading import teacher_checkpoint_path

    student = Path(str(cfg.bench.student)).expanduser() if cfg.bench.get("student") else student_checkpoint_path(cfg)
    found = [("teacher", teacher_checkpoint_path(cfg), None), ("student", student, None)]
    rounds = verified_rounds(cfg, data) if cfg.bench.get("few_step", True) and progressive_dir(cfg).is_dir() else []
    if rounds:
        n, few = rounds[-1]
        found.append((f"student_{n}step", few, n))
    return found


def bench_provenance(cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """What the bench is made of: its settings and the files of the models it times."""
    return provenance.record(cfg, "bench", {name: provenance.file_digest(path)
                                            for name, path, _ in bench_checkpoints(cfg, data)})


def bench_models(cfg: DictConfig, data: ImageData) -> list[BenchModel]:
    """The models of :func:`bench_checkpoints`, ready to time."""
    from student.loading import load_student
    from teacher.guidance import ConditionalPrediction, GuidedPrediction
    from teacher.loading import load_teacher

    use_jit = bool(cfg.jit)
    args = (data.image_shape, data.num_classes)
    models = []
    for name, path, steps in bench_checkpoints(cfg, data):
        net = load_teacher(cfg, data) if name == "teacher" else load_student(cfg, data, path)[0]
        cell = GuidedPrediction(net) if name == "teacher" else ConditionalPrediction(net)
        models.append(BenchModel(name, jit_predictor(cell, use_jit), int(cell.passes),
                                 forward_flops(net, *args)["total"], str(path), steps=steps))
    return models


@dataclass(frozen=True)
class Entry:
    """A model at one step count with one engine: one timed column of the bench."""

    model: str
    engine: str
    steps: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.engine}/{self.steps}"


def entries(models: list[BenchModel], opts: dict[str, Any]) -> list[Entry]:
    """Compiled: each model at every grid step count (a few-step student at its own); eager: the
    ``eager_models`` at the reference step count."""
    out = []
    for m in models:
        for s in ([m.steps] if m.steps else opts["step_counts"]):
            out.append(Entry(m.name, opts["engine"], s))
    out += [Entry(name, "eager", opts["reference_steps"]) for name in opts["eager_models"]]
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- timing
def run_bench(cfg: DictConfig) -> Path:
    """Time the grid in this process (the run's ``cpu_threads``) and, for the batch sizes up to
    ``bench.single_thread_max_batch``, once more in a child process with one CPU kernel thread
    (MindSpore fixes the thread count once per process); write bench.{json,md,png}."""
    opts = bench_options(cfg.bench)
    data = load_data(cfg.data)
    machine = machine_info(str(cfg.device))
    base = build.sampler_settings(cfg)
    own = current().cpu_threads
    groups = [time_grid(cfg, data, opts, opts["batch_sizes"], own)]
    small = [b for b in opts["batch_sizes"] if opts["single_thread_max_batch"] and b <= opts["single_thread_max_batch"]]
    if small and own != 1:
        groups.append(time_grid_in_child(cfg, opts, small, 1))
    machine["load_average_after"] = load_average()
    warning = busy_warning(machine)
    if warning:
        log.warning("bench: %s", warning)
    models = groups[0]["models"]
    results = [r for g in groups for r in g["results"]]
    report = {"provenance": bench_provenance(cfg, data), "machine": machine, "busy_warning": warning, "options": opts,
              "w": float(cfg.sampler.w), "seed": int(cfg.seed), "jit": bool(cfg.jit), "image_shape": list(data.image_shape),
              "sampler": {"kind": base.kind, "eta": base.eta, "w_schedule": base.w_schedule,
                          "clip_x0": base.clip_x0, "dynamic_threshold": base.dynamic_threshold},
              "models": models,
              "flops_counted": "2 x multiply-adds of convolutions, dense layers and attention matmuls",
              "peak_gflops": groups[0]["peaks"],
              "peak_gflops_by_threads": {thread_label(g["cpu_threads"]): g["peaks"] for g in groups},
              "speedup_definition": "slower time / faster time per sampler call (medians; paired spread in ratios)",
              "results": results,
              "best_threads": best_of_threads(results, models, opts) if len(groups) > 1 else None}
    out = build.run_dir(cfg) / "bench"
    table = markdown_report(report)
    write_json(out / "bench.json", report)
    write_text(out / "bench.md", table)
    plot(report, out / "bench.png")
    write_tensorboard(report, build.run_dir(cfg) / "tb")
    print(table)
    return out / "bench.json"


def thread_label(threads: Optional[int]) -> str:
    """How a group's CPU kernel thread count is shown: the number, or MindSpore's default."""
    return "default" if threads is None else str(threads)


def time_grid_in_child(cfg: DictConfig, opts: dict[str, Any], batch_sizes: list[int], threads: int) -> dict[str, Any]:
    """:func:`time_grid` in a fresh process with ``threads`` CPU kernel threads (spawned: MindSpore
    takes the count once per process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["cpu_threads"] = threads
    plain["distributed"] = False  # the bench runs on rank 0 alone; its child joins no worker group
    log.info("bench: timing batch sizes %s again with %d CPU kernel thread(s) in a child process", batch_sizes, threads)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_grid, plain, opts, batch_sizes).result()


def _child_grid(plain: dict[str, Any], opts: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from distill.core.runtime import setup_from_config

    cfg = OmegaConf.create(plain)  # a fresh process: set up as the parent was, with its own thread count
    setup_from_config(cfg)
    return time_grid(cfg, load_data(cfg.data), opts, batch_sizes, current().cpu_threads)


def time_grid(cfg: DictConfig, data: ImageData, opts: dict[str, Any], batch_sizes: list[int],
              threads: Optional[int]) -> dict[str, Any]:
    """Every entry at each batch size, interleaved, in this process: the batch results, the models
    and this process's matmul peaks."""
    from tqdm import tqdm
    from distill.jobs.common import uncond_labels

    models = bench_models(cfg, data)
    by_name = {m.name: m for m in models}
    todo = entries(models, opts)
    base = build.sampler_settings(cfg)
    peaks = matmul_peak(opts["peak_matmul_size"])
    w, seed, nc = float(cfg.sampler.w), int(cfg.seed), data.num_classes

    def settings_of(e: Entry) -> SamplerSettings:
        return dataclasses.replace(base, num_steps=e.steps, engine=e.engine)

    label = thread_label(threads)
    bar = tqdm(total=len(batch_sizes) * len(todo) * opts["repeats"], desc=f"bench ({label} threads)", unit="run",
               dynamic_ncols=True)
    results = []
    for batch in batch_sizes:
        noise = np.random.default_rng((seed, batch)).standard_normal((batch, *data.image_shape)).astype(np.float32)
        labels = (np.arange(batch) % nc).astype(np.int32)
        y_unc = uncond_labels(cfg, batch, nc)

        def run(e: Entry) -> float:
            return _timed(lambda: sample(by_name[e.model].predictor, noise, labels, w, settings_of(e), y_unc, seed))

        compile_s = {}
        for e in todo:  # the first call compiles (per shape and, for the loop engine, per step count)
            bar.set_postfix_str(f"warm-up batch {batch} {e.key}")
            first = run(e)
            for _ in range(opts["warmup"]):
                steady = run(e)
            compile_s[e] = max(0.0, first - steady) if opts["warmup"] else None
        times: dict[Entry, list[float]] = {e: [] for e in todo}
        for r in range(opts["repeats"]):
            k = r % len(todo)
            for e in todo[k:] + todo[:k]:
                bar.set_postfix_str(f"batch {batch} {e.key}")
                times[e].append(run(e))
                bar.update(1)
        results.append({**batch_result(batch, todo, times, compile_s, by_name, peaks, opts), "cpu_threads": label})
    bar.close()
    return {"cpu_threads": threads, "peaks": peaks, "results": results,
            "models": [{"name": m.name, "passes": m.passes, "checkpoint": m.checkpoint,
                        "steps": m.steps, "forward_flops_per_image": m.flops_per_image} for m in models]}


def batch_result(batch: int, todo: list[Entry], times: dict[Entry, list[float]], compile_s: dict[Entry, Any],
                 models: dict[str, BenchModel], peaks: dict[str, float], opts: dict[str, Any]) -> dict[str, Any]:
    """One batch size's entries (stats, GFLOP/s, compile time) and the ratios between them."""
    rows = []
    for e in todo:
        m = models[e.model]
        stats = summarize(times[e], batch, e.steps)
        rows.append({"model": e.model, "engine": e.engine, "steps": e.steps, "passes": m.passes,
                     "evals_per_image": m.passes * e.steps, "seconds": times[e], "compile_seconds": compile_s[e],
                     **stats, **flop_rate(m.flops_per_image, m.passes * e.steps, batch,
                                          float(np.median(times[e])), peaks)})
    steps = {m.name: m.steps for m in models.values()}
    return {"batch": batch, "entries": rows, "ratios": ratios_of(times, steps, opts)}


def ratios_of(times: dict[Entry, list[float]], own_steps: dict[str, Optional[int]],
              opts: dict[str, Any]) -> dict[str, Any]:
    """The speed-ups between timed entries: compiled vs eager, one pass vs two, few-step student vs
    the teacher at the reference steps (``own_steps``: a model's own step count, or None)."""
    ref = opts["reference_steps"]
    ratios: dict[str, Any] = {}

    def ratio(name: str, slow: Entry, fast: Entry, limit: Optional[float] = None) -> None:
        if slow in times and fast in times:
            ratios[name] = {**speedup(times[slow], times[fast]), "limit": limit}

    eng = opts["engine"]
    for model in ("student", "teacher"):
        ratio(f"{model}_{eng}_vs_eager_{ref}steps", Entry(model, "eager", ref), Entry(model, eng, ref))
    for s in opts["step_counts"]:
        ratio(f"one_pass_vs_two_pass_{s}steps", Entry("teacher", eng, s), Entry("student", eng, s), 2.0)
    for name, steps in own_steps.items():
        if steps:
            ratio(f"{name}_vs_teacher_{ref}steps", Entry("teacher", eng, ref), Entry(name, eng, steps),
                  2.0 * ref / steps)
    return ratios


def best_of_threads(results: list[dict[str, Any]], models: list[dict[str, Any]],
                    opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size, every entry at its fastest thread count (lowest median) and the speed-ups
    between those: what a user who sets ``cpu_threads`` for their batch size gets."""
    own_steps = {m["name"]: m["steps"] for m in models}
    out = []
    for batch in dict.fromkeys(r["batch"] for r in results):
        best: dict[Entry, dict[str, Any]] = {}
        for r in (r for r in results if r["batch"] == batch):
            for e in r["entries"]:
                key = Entry(e["model"], e["engine"], e["steps"])
                if key not in best or np.median(e["seconds"]) < np.median(best[key]["seconds"]):
                    best[key] = {**e, "cpu_threads": r["cpu_threads"]}
        times = {k: v["seconds"] for k, v in best.items()}
        out.append({"batch": batch, "threads": {k.key: v["cpu_threads"] for k, v in best.items()},
                    "ms_per_step": {k.key: v["ms_per_step"]["median"] for k, v in best.items()},
                    "ratios": ratios_of(times, own_steps, opts)})
    return out


# ----------------------------------------------------------------------------- reports
def markdown_report(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    flops = {x["name"]: x["forward_flops_per_image"] for x in report["models"]}
    peaks = "; ".join(f"{t} threads: numpy {p['numpy_matmul']:.0f} GFLOP/s, MindSpore {p['mindspore_matmul']:.0f} GFLOP/s"
                      for t, p in report["peak_gflops_by_threads"].items())
    lines = ["# Sampling speed: two-pass CFG teacher, one-pass student, few-step student\n",
             f"{m['device']} / {m['platform']} / {m['cpu_count']} CPUs / MindSpore {m['mindspore']} / oneDNN ISA cap "
             f"{m['onednn_max_cpu_isa']}; load average {m['load_average_1_5_15']} before, {m['load_average_after']} "
             f"after. Medians of {o['repeats']} interleaved runs after {o['warmup']} warm-up runs (quartiles in "
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
