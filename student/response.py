"""``task=response``: how strongly the student guides at each sampling time, measured against the teacher.

Held-out images are noised to each DDIM time t of the sampler. There the teacher gives its
conditional and unconditional x-predictions c and u (one batched call), the student its
x-prediction s(w). Two numbers per (t, w):

- effective w: the projection of s - u on c - u, ``sum((s - u) (c - u)) / sum((c - u)^2)``; w for a
  student that guides exactly as the two-pass teacher, lower when its w response is compressed;
- relative error: ``|s - (u + w (c - u))| / |c - u|``, the whole miss in units of the guidance
  direction's size (the part along c - u is ``|effective w - w|``, the rest is orthogonal to it).

Sample metrics (task=evaluate) say *whether* a student falls short at some w; this says at which
sampling times and whether the cause is guidance strength or everything else.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import mindspore as ms

from distill.core import diffusion as dm
from distill.core.report import markdown_table

log = logging.getLogger(__name__)


def effective_w(student_x: np.ndarray, cond_x: np.ndarray, uncond_x: np.ndarray) -> float:
    """The w whose guided output ``u + w (c - u)`` is closest to ``student_x`` (least squares over the batch)."""
    d = (cond_x - uncond_x).astype(np.float64)
    return float(((student_x - uncond_x) * d).sum() / max((d * d).sum(), 1e-30))


def relative_error(student_x: np.ndarray, cond_x: np.ndarray, uncond_x: np.ndarray, w: float) -> float:
    """``|s - (u + w (c - u))| / |c - u|`` over the batch."""
    d = (cond_x - uncond_x).astype(np.float64)
    err = float(np.sqrt(((student_x - (uncond_x + w * d)) ** 2).sum()))
    return err / max(float(np.sqrt((d * d).sum())), 1e-30)


def guidance_response(teacher: Callable[..., tuple[ms.Tensor, ms.Tensor]], student: Callable[..., ms.Tensor],
                      x: np.ndarray, y: np.ndarray, null_class: int, times: np.ndarray, ws: list[float],
                      schedule: str, prediction: str, seed: int,
                      target_interval: tuple[float, float] | None = None,
                      w_interval: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """One row per t: ``{"t", "effective_w": {w: ...}, "relative_error": {w: ...}}``. ``teacher``
    gives (cond, uncond) (:class:`GuidanceBranches`), ``student`` one prediction; both jitted or not.
    ``target_interval``: the student's target guides only there (``student.target=interval``), so the relative
    error is against w inside and the conditional output outside; ``w_interval``: the student's w input is 1
    outside that interval, as in its training and sampling (:func:`student.distill.input_interval`)."""
    n = x.shape[0]
    eps = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    y_t, y_null = ms.Tensor(y.astype(np.int32)), ms.Tensor(np.full(n, null_class, np.int32))
    rows = []
    for t in times:
        tt = np.full(n, t, np.float32)
        z, alpha, sigma = dm.noisy_at(schedule, x, eps, tt)
        alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        z_t, t_t = ms.Tensor(z), ms.Tensor(tt)
        to_x = lambda out: dm.x0_eps_from_output(z, out.asnumpy(), alpha, sigma, prediction)[0]  # noqa: E731
        cond, uncond = (to_x(o) for o in teacher(z_t, t_t, y_t, ms.Tensor(np.ones(n, np.float32)), y_null))
        row: dict[str, Any] = {"t": float(t), "effective_w": {}, "relative_error": {}}
        for w in ws:
            s = to_x(student(z_t, t_t, y_t, ms.Tensor(np.full(n, dm.interval_w(w, t, w_interval), np.float32)),
                             y_null))
            row["effective_w"][w] = effective_w(s, cond, uncond)
            row["relative_error"][w] = relative_error(s, cond, uncond, float(dm.interval_w(w, t, target_interval)))
        log.info("response: t=%.3f effective w %s", t, " ".join(f"{v:.3f}" for v in row["effective_w"].values()))
        rows.append(row)
    return rows


def response_markdown(rows: list[dict[str, Any]], ws: list[float], num_images: int,
                      target_interval: tuple[float, float] | None = None,
                      w_interval: tuple[float, float] | None = None) -> str:
    def table(title: str, key: str) -> list[str]:
        return [f"## {title}\n", markdown_table(["t"] + [f"w={w:g}" for w in ws],
                                                ([f"{r['t']:.4f}"] + [f"{r[key][w]:.3f}" for w in ws] for r in rows),
                                                right=True)]

    intro = ["# Guidance response of the student\n",
             f"{num_images} held-out images noised to each sampling time. Effective w: the projection of the "
             "student's x-prediction minus the teacher's unconditional one on the teacher's cond - uncond "
             "(equal to w for a perfect student). Relative error: |student - guided teacher| / |cond - uncond|.\n"]
    if target_interval is not None:
        lo, hi = target_interval
        intro.append(f"The student's target guides only at t in [{lo:g}, {hi:g}] (the conditional output outside, "
                     "where a perfect student's effective w is 1 and the relative error is against it); its w input "
                     + ("was 1 outside that interval.\n" if w_interval is not None else "was w at every t.\n"))
    return "\n".join(intro + table("Effective w", "effective_w") + [""]
                     + table("Relative error", "relative_error")) + "\n"


