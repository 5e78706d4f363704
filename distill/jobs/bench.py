"""``task=bench``: sampling speed of the two-pass teacher, the one-pass student and the few-step
student, with the compiled engine against the eager reference, in one process.

For each batch size every entry (a model at a step count with an engine) is warmed up (its first
call, i.e. the compile, is timed apart), then all entries run interleaved, the order rotating per
repeat, so machine noise hits them alike. Each timed run is one full :func:`sample` call on the same
noise and labels. The FLOPs of one forward pass are counted from the network's layers, and a large
matmul timed in the same process gives the machine's peak for the percentages.
The statistics and the peak are :mod:`distill.core.speed`, the FLOP count :mod:`teacher.flops`, the
Markdown, plot and TensorBoard output :mod:`distill.jobs.bench_report`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import write_json, write_text
from distill.core.runtime import current
from distill.core.sampling import Predictor, SamplerSettings, jit_predictor, sample
from distill.core.speed import (busy_warning, cpu_clock, flop_rate, load_average, machine_info, matmul_peak,
                                other_cores, speedup, summarize, timed)
from distill.jobs.bench_report import markdown_report, plot, write_tensorboard
from teacher.flops import forward_flops

log = logging.getLogger(__name__)
GRID_MODELS = ("teacher", "student")  # timed at every grid step count; may also run eager


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
    from student.model import check_one_head
    from teacher.guidance import ConditionalPrediction, GuidedPrediction
    from teacher.loading import load_teacher

    use_jit = bool(cfg.jit)
    args = (data.image_shape, data.num_classes)
    models = []
    for name, path, steps in bench_checkpoints(cfg, data):
        net = load_teacher(cfg, data) if name == "teacher" else load_student(cfg, data, path)[0]
        if name != "teacher":
            check_one_head(net, "task=bench")
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
    clock = cpu_clock()
    groups = [time_grid(cfg, data, opts, opts["batch_sizes"], own)]
    small = [b for b in opts["batch_sizes"] if opts["single_thread_max_batch"] and b <= opts["single_thread_max_batch"]]
    if small and own != 1:
        groups.append(time_grid_in_child(cfg, opts, small, 1))
    machine["load_average_after"] = load_average()
    machine["other_cores"] = other_cores(clock, cpu_clock())
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
            return timed(lambda: sample(by_name[e.model].predictor, noise, labels, w, settings_of(e), y_unc, seed))

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


