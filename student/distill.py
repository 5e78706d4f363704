"""Stage-one distillation batches: the two-pass guided teacher output is the student's target.

Each step draws data x with labels y, t ~ U(0, 1), w per example (:func:`sample_w`), a
negative class per example (:func:`sample_negative`: the null class, or for a student with a
negative-class input sometimes another class) and z_t = q_sample(x, t). The frozen teacher (EMA
weights) gives ``out(neg) + w (out(y) - out(neg))`` in one batched call; the student regresses onto it with :func:`teacher.objective.regression_loss`
and a per-example weight that puts the loss in x-space (truncated SNR), eps or v.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import mindspore as ms

from distill.core import diffusion as dm
from distill.core.data import ImageData, step_batches
from distill.core.errors import UserError


def check_w_range(w_min: float, w_max: float, power: float = 1.0) -> None:
    if not (np.isfinite(w_min) and np.isfinite(w_max)) or w_min < 0 or w_max < w_min:
        raise UserError(f"student: w range [{w_min}, {w_max}] must satisfy 0 <= w_min <= w_max")
    if not (np.isfinite(power) and power > 0):
        raise UserError(f"student: w_power={power} must be a number > 0")


def check_w_loss_power(power: float) -> None:
    if not (np.isfinite(power) and power >= 0):
        raise UserError(f"student: w_loss_power={power} must be a number >= 0")


def sample_w(rng: np.random.Generator, n: int, w_min: float, w_max: float, power: float = 1.0) -> np.ndarray:
    """n guidance weights ``w_min + (w_max - w_min) * u ** power`` with u ~ U(0, 1).

    power 1 is uniform; power > 1 puts more examples at low w. Why that helps: the student
    starts as the conditional model (w = 1) and its error grows like (w - 1)^2, so uniform w
    spends most of the loss on large w, while w near 0 is where the student must learn to
    ignore its class input (measured: uniform left w = 0 samples 5 points too class-like).
    """
    return (w_min + (w_max - w_min) * rng.uniform(0.0, 1.0, n) ** power).astype(np.float32)


def guidance_loss_weight(w: np.ndarray, power: float) -> np.ndarray:
    """Per-example loss factor ``(1 + w) ** -power``.

    The student's error grows with w (the target moves (w - 1)(cond - uncond) away from where
    it starts), so with equal weights the few large-w examples dominate the gradient and the
    student settles on a w response that leaks the class at w = 0 and under-conditions at
    w = 1. Measured effective w (projection on cond - uncond, t in 0.2-0.6) at w = 0 / 1:
    0.09 / 0.87 with power 0, 0.06 / 0.92 with power 2.
    """
    return ((1.0 + np.asarray(w, np.float32)) ** -float(power)).astype(np.float32)


def w_distribution(source: Mapping[str, Any]) -> tuple[float, float, float]:
    """(w_min, w_max, w_power) from the ``student`` config or a student checkpoint's meta
    (students from before w_power drew w uniformly: power 1). With ``target=cfgpp`` the student's w input is
    CFG++'s lambda: the config's ``lambda_range`` (inside [0, 1]) replaces [w_min, w_max] (a checkpoint's meta
    records that range as its w_min, w_max)."""
    power = float(source.get("w_power", 1.0))
    if str(source.get("target", "cfg")) == "cfgpp" and source.get("lambda_range") is not None:
        return (*dm.check_lambda_range(list(source["lambda_range"])), power)
    return float(source["w_min"]), float(source["w_max"]), power


def describe_w(w_min: float, w_max: float, power: float) -> str:
    """The w distribution in words, for logs and the model card."""
    if power == 1.0:
        return f"w ~ U[{w_min:g}, {w_max:g}]"
    return f"w = {w_min:g} + {w_max - w_min:g} u^{power:g}, u ~ U(0, 1)"


def check_p_null_negative(p: float) -> None:
    if not (np.isfinite(p) and 0.0 <= p <= 1.0):
        raise UserError(f"student: p_null_negative={p} must be in [0, 1]")


def negative_draw(source: Mapping[str, Any]) -> float:
    """The probability of the null class as an example's negative class, from the ``student`` config or
    a student checkpoint's meta: 1 (always null, today's student) unless the student takes a negative."""
    return float(source.get("p_null_negative", 0.5)) if source.get("negative", False) else 1.0


def sample_negative(rng: np.random.Generator, y: np.ndarray, num_classes: int, p_null: float) -> np.ndarray:
    """One negative class per label: the null class (index ``num_classes``) with probability ``p_null``,
    otherwise a uniformly drawn class other than the label. ``p_null`` 1 draws nothing from ``rng``,
    so a null-negative student's batches are those of a student without the input."""
    y = np.asarray(y, np.int64)
    if p_null >= 1.0:
        return np.full(len(y), num_classes, np.int32)
    other = (y + rng.integers(1, num_classes, len(y))) % num_classes
    return np.where(rng.uniform(0.0, 1.0, len(y)) < p_null, num_classes, other).astype(np.int32)


TARGETS = ("cfg", "interval", "cfgpp")


def distill_target(source: Mapping[str, Any]) -> tuple[str, Optional[tuple[float, float]]]:
    """(target, guidance interval or None) the student is distilled to, from the ``student`` config or a student
    checkpoint's meta (students from before the option: ``cfg``). ``interval``: the teacher's guided output at
    times t in [t_lo, t_hi] (the sampler's ``guidance_interval`` rule), its conditional output elsewhere.
    ``cfgpp``: two output heads, the teacher's guided output at w = lambda and its unconditional output
    (:func:`distill.core.diffusion.cfgpp_heads`), what a CFG++ sampler step takes from the two passes."""
    target = str(source.get("target", "cfg"))
    if target not in TARGETS:
        raise UserError(f"student: unknown target '{target}' (choose {', '.join(TARGETS)})")
    if target in ("cfg", "cfgpp"):
        return target, None
    interval = source.get("interval")
    if interval is None:
        raise UserError("student: target=interval needs student.interval=[t_lo, t_hi] (t = 1 noise, t = 0 data)")
    return target, dm.check_interval(list(interval), "student.interval")


def input_interval(source: Mapping[str, Any]) -> Optional[tuple[float, float]]:
    """The guidance interval the student's w *input* follows, from the ``student`` config or a student
    checkpoint's meta, or None (w at every t). With ``target=interval`` and ``interval_input`` (the default) the
    student is trained and sampled at the interval teacher's effective weight, w inside and 1 outside
    (:func:`distill.core.diffusion.interval_w`), so the switch at the interval's edges is in its input, not
    learnt in t. Interval students from before the option (no ``interval_input`` in their meta) took w at
    every t: they stay sampled that way. A progressive round records its own (``w_interval``, on its grid:
    :func:`student.progressive.round_w_intervals`)."""
    if "w_interval" in source:
        return None if source["w_interval"] is None else dm.check_interval(list(source["w_interval"]), "w_interval")
    target, interval = distill_target(source)
    return interval if target == "interval" and bool(source.get("interval_input", False)) else None


def describe_target(target: str, interval: Optional[tuple[float, float]], w_input: bool = False) -> str:
    """The target in words, for logs and the model card (``w_input``: the student takes the effective w)."""
    if target == "interval":
        return (f"CFG inside t in [{interval[0]:g}, {interval[1]:g}], the conditional output outside"
                + (" (the student's w input 1 there)" if w_input else ""))
    if target == "cfgpp":
        return "CFG++: the guided output at w = lambda and the unconditional output, two heads"
    return "CFG at every t"


def check_ws_per_input(ws_per_input: int, batch_size: int) -> None:
    if isinstance(ws_per_input, bool) or not isinstance(ws_per_input, (int, np.integer)) or ws_per_input < 1 \
            or batch_size % ws_per_input:
        raise UserError(f"student: ws_per_input={ws_per_input!r} must be an integer >= 1 that divides the "
                        f"batch size {batch_size}")


def distill_inputs(data: ImageData, batch_size: int, seed: int, start_step: int, schedule: str,
                   w_min: float, w_max: float, power: float = 1.0,
                   ws_per_input: int = 1, p_null_negative: float = 1.0, share: Optional[tuple[int, int]] = None,
                   w_interval: Optional[tuple[float, float]] = None) -> Callable[[int], tuple[np.ndarray, ...]]:
    """step -> (z_t, t, y, w, y_neg, alpha, sigma): the inputs of one distillation step, on the host.

    With ``ws_per_input`` k > 1 the batch is ``batch_size / k`` noisy inputs (x, y, y_neg, t, noise), each
    repeated in k adjacent rows with its own w: the teacher then runs once per input
    (:func:`teacher_targets`) and the student sees how its target moves with w alone. ``share``: read only
    this rank's rows of a streamed batch (for a caller that keeps this rank's slice). ``w_interval``
    (:func:`input_interval`): each row's w is its effective w, 1 where its t lies outside that interval (drawn
    as before, then replaced: the rest of the batch is unchanged).
    """
    check_w_range(w_min, w_max, power)
    check_ws_per_input(ws_per_input, batch_size)
    k = ws_per_input
    draw = step_batches(data, batch_size // k, seed, start_step, 2, share=share)

    def make(step: int) -> tuple[np.ndarray, ...]:
        x, y, rng = draw(step)
        n = x.shape[0]
        t = rng.uniform(0.0, 1.0, n).astype(np.float32)
        w = sample_w(rng, n * k, w_min, w_max, power)
        eps = rng.standard_normal(x.shape).astype(np.float32)
        y_neg = sample_negative(rng, y, data.num_classes, p_null_negative)  # drawn last: the rest stays as before
        z, alpha, sigma = dm.noisy_at(schedule, x, eps, t)
        z, t, y, y_neg, alpha, sigma = (np.repeat(a, k, axis=0) for a in (z, t, y, y_neg, alpha, sigma))
        return z, t, y.astype(np.int32), dm.interval_w(w, t, w_interval), y_neg, alpha, sigma

    return make


def teacher_targets(teacher_branches: Callable[..., tuple[ms.Tensor, ms.Tensor]],
                    inputs: tuple[np.ndarray, ...], ws_per_input: int = 1,
                    interval: Optional[tuple[float, float]] = None, target: str = "cfg") -> np.ndarray:
    """The two-pass guided teacher output ``out(neg) + w (out(y) - out(neg))`` (neg = each row's
    negative class, the null class for plain CFG) for one batch of distillation inputs;
    ``teacher_branches`` gives (cond, uncond) (:class:`GuidanceBranches`).
    With ``ws_per_input`` k the teacher runs on every k-th row only (the rows in between repeat it).
    With a guidance ``interval`` (``student.target=interval``) a row whose t lies outside it gets the
    conditional output ``out(y)`` instead (:func:`distill.core.diffusion.interval_guided`). With ``target=cfgpp``
    the target has twice the channels: the guided output at w (lambda), then ``out(neg)``
    (:func:`distill.core.diffusion.cfgpp_heads`)."""
    z, t, y, w, y_neg, _, _ = inputs
    t_rows, k = t, ws_per_input
    z, t, y, y_neg = z[::k], t[::k], y[::k], y_neg[::k]
    cond, uncond = teacher_branches(ms.Tensor(z), ms.Tensor(t), ms.Tensor(y), ms.Tensor(w[::k]),
                                    ms.Tensor(y_neg.astype(np.int32)))
    cond, uncond = (np.repeat(a.asnumpy(), k, axis=0) for a in (cond, uncond))
    if target == "cfgpp":
        return dm.cfgpp_heads(cond, uncond, w).astype(np.float32)
    if interval is not None:
        return dm.interval_guided(cond, uncond, w, t_rows, interval).astype(np.float32)
    return dm.cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1)).astype(np.float32)


def regression_batch(inputs: tuple[np.ndarray, ...], target: np.ndarray, loss_space: str,
                     prediction: str, w_loss_power: float = 0.0) -> tuple[np.ndarray, ...]:
    """(z, t, y, w, y_neg, target, weight) for :func:`teacher.objective.regression_loss`."""
    z, t, y, w, y_neg, alpha, sigma = inputs
    weight = dm.output_space_weight(loss_space, prediction, alpha, sigma) * guidance_loss_weight(w, w_loss_power)
    return z, t, y, w, y_neg.astype(np.int32), target.astype(np.float32), weight
