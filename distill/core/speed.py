"""Speed measurement: timing statistics, speed-ups, achieved GFLOP/s against a matmul peak measured on
the same machine, and what the machine was doing (load average, other processes' CPU use) while it
was measured.

Pure functions of timings except :func:`matmul_peak` and the machine readers; ``task=bench`` uses them.
"""
from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np


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
        best = min(timed(fn) for _ in range(repeats))
        out[name] = 2.0 * n**3 / best / 1e9
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    import mindspore

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "mindspore": mindspore.__version__, "device": device,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "load_average_1_5_15": load_average()}


def cpu_clock() -> dict[str, float] | None:
    """Now: the CPU seconds every process on the machine has kept busy since boot (``/proc/stat``: all but
    idle and iowait; a virtual machine's steal counts as busy), this process's own with its waited-for
    children, and a monotonic wall clock. None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return {"busy_seconds": busy, "own_seconds": own, "wall_seconds": time.monotonic()}


def other_cores(start: dict[str, float] | None, end: dict[str, float] | None) -> float | None:
    """How many cores, on average, processes other than this one (and its children) kept busy between two
    :func:`cpu_clock` readings; None without both readings."""
    if not start or not end or end["wall_seconds"] <= start["wall_seconds"]:
        return None
    others = (end["busy_seconds"] - start["busy_seconds"]) - (end["own_seconds"] - start["own_seconds"])
    return max(0.0, others / (end["wall_seconds"] - start["wall_seconds"]))


OTHER_CORES_BUSY = 0.25  # other processes using more than this many cores on average make the timings suspect


def busy_warning(machine: dict[str, Any]) -> Optional[str]:
    """A warning when other processes kept more than OTHER_CORES_BUSY cores busy while the timings ran
    (``other_cores``, read from /proc/stat). Where that cannot be read, the 1-minute load average before or
    after above the core count stands in for it; where it can, the load average is left out of the verdict,
    since it also counts this job's own kernel threads and what ran just before it (a pipeline's evaluation)."""
    cores = machine.get("cpu_count") or 1
    others = machine.get("other_cores")
    if others is not None:
        if others > OTHER_CORES_BUSY:
            return (f"the machine was busy (other processes kept {others:.2f} of {cores} cores busy on average "
                    f"while the timings ran): absolute timings are pessimistic, ratios of interleaved runs less so")
        return None
    loads = [la[0] for la in (machine.get("load_average_1_5_15"), machine.get("load_average_after")) if la]
    if loads and max(loads) > cores:
        return (f"the machine was busy (1-minute load average up to {max(loads):.1f} on {cores} cores): "
                f"absolute timings are pessimistic, ratios of interleaved runs less so")
    return None
