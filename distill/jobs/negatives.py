"""Negative-class guidance in ``task=evaluate``: ``out(neg) + w (out(y) - out(neg))``, the two-pass
teacher against each one-pass student that takes a negative class, on the same noise.

Each pair (target y, negative K) of ``eval.negative_classes`` gets ``eval.negative_samples`` samples
at every w, drawn twice per model from the same noise: once guided away from K, once with the null
class (plain CFG). The noise is that of the main evaluation's first samples of class y, so with a
deterministic sampler the null-class samples are the main evaluation's own and are not drawn again
(:func:`null_pool`). Judged by the evaluation classifier: the Frechet distance of the pooled samples to
the held-out images of the target classes, the target-class accuracy, and the mean probability of
the negative class K, which negative guidance should lower against the null-class samples.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from distill.core.classifier import EvalClassifier, features_and_probabilities
from distill.core.data import ImageData
from distill.core.errors import UserError
from distill.core.images import save_samples_npz, save_side_by_side_png
from distill.core.metrics import accuracy, frechet_distance
from distill.core.sampling import Predictor, SamplerSettings, initial_noise, sample_in_batches
from distill.jobs.common import balanced_labels

log = logging.getLogger(__name__)
KINDS = ("null", "negative")  # the same samples guided with the null class, then with the pair's negative class
FD_BAR, PROB_BAR, MAX_BAR_W = 1.15, 0.20, 4.0  # student vs its teacher, at every w <= MAX_BAR_W


def negative_pairs(cfg: DictConfig, num_classes: int) -> list[tuple[int, int]]:
    """``eval.negative_classes`` as (target, negative) pairs, each a pair of distinct class indices."""
    pairs = []
    for entry in cfg.eval.get("negative_classes") or []:
        if len(entry) != 2:
            raise UserError(f"eval.negative_classes: each entry is [target, negative], got {list(entry)}")
        y, neg = int(entry[0]), int(entry[1])
        if not (0 <= y < num_classes and 0 <= neg < num_classes):
            raise UserError(f"eval.negative_classes: {[y, neg]} is not a pair of class indices in [0, {num_classes}) "
                            f"(set eval.negative_classes=[] for data with fewer classes)")
        if y == neg:
            raise UserError(f"eval.negative_classes: {[y, neg]}: the negative class equals the target class")
        pairs.append((y, neg))
    return pairs


NegativeInputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # noise, labels, negatives, rows


def negative_rows(pairs: list[tuple[int, int]], per_pair: int, num_classes: int) -> np.ndarray:
    """Each pair's ``per_pair`` sample indices, pair by pair: the main evaluation's first samples of the pair's
    target class (sample i there is of class i mod C, :func:`distill.jobs.common.guided_samples`)."""
    classes = balanced_labels(per_pair * num_classes, num_classes)  # rows enough for per_pair of every class
    return np.concatenate([np.flatnonzero(classes == y)[:per_pair] for y, _ in pairs])


def negative_inputs(pairs: list[tuple[int, int]], per_pair: int, shape: tuple[int, ...], seed: int,
                    num_classes: int) -> NegativeInputs:
    """(noise, target labels, negative labels, rows) of every sample, pair by pair: a pair's samples start from
    the noise of its :func:`negative_rows` (row i of ``initial_noise(seed, ...)``, as in the main evaluation)."""
    rows = negative_rows(pairs, per_pair, num_classes)
    labels = np.repeat([y for y, _ in pairs], per_pair).astype(np.int32)
    negatives = np.repeat([k for _, k in pairs], per_pair).astype(np.int32)
    return initial_noise(seed, per_pair * num_classes, shape)[rows], labels, negatives, rows


def negative_models(models: dict[str, Any]) -> list[str]:
    """The evaluated models that can take a negative class: the teacher and each student built for it."""
    return [name for name, (cell, _) in models.items() if name == "teacher" or getattr(cell.net, "has_negative", False)]


NegativePlan = tuple[list[tuple[int, int]], list[str]]  # (target, negative) pairs; the models compared on them


def negative_plan(cfg: DictConfig, num_classes: int, models: dict[str, Any]) -> NegativePlan | None:
    """The pairs and the models of the negative-class comparison, or None when no student takes a negative
    class or ``eval.negative_classes`` is empty. Bad pairs fail here, before any sampling."""
    names = negative_models(models)
    if len(names) < 2 or not cfg.eval.get("negative_classes"):
        return None
    skipped = [n for n in models if n not in names]
    if skipped:
        log.info("evaluate: %s take(s) no negative class; left out of the negative-class comparison", skipped)
    return negative_pairs(cfg, num_classes), names


NullPool = dict[tuple[str, float], np.ndarray]  # (model, w) -> the main evaluation's samples


def null_pool(cfg: DictConfig, plan: NegativePlan | None, settings: dict[str, SamplerSettings], scale: str,
              num_classes: int) -> NullPool | None:
    """An empty pool for the main evaluation's samples of the plan's models when the comparison's null-class
    samples are among them: the main evaluation guided with the null class over ``eval.ws`` with a
    deterministic sampler (DDIM, eta 0), and at least ``eval.negative_samples`` samples of every class; else
    None (the null-class samples are drawn). Every data-parallel worker decides alike."""
    if plan is None or scale != "w" or cfg.sampler.get("negative_class") is not None:
        return None
    if any(settings[name].stochastic for name in plan[1]):
        return None
    rows = negative_rows(plan[0], int(cfg.eval.negative_samples), num_classes)
    return {} if int(rows.max()) < int(cfg.eval.num_samples) else None


def draw_negative_samples(cfg: DictConfig, data: ImageData, inputs: NegativeInputs, names: list[str],
                          predictors: dict[str, Predictor], settings: dict[str, SamplerSettings], w: float,
                          across_ranks: bool = False, pool: NullPool | None = None
                          ) -> dict[tuple[str, str], np.ndarray]:
    """(model, kind) -> images at ``w`` from ``inputs`` (:func:`negative_inputs`), the null-class ones taken from
    ``pool`` (:func:`null_pool`) when given; every data-parallel worker calls it in the same order."""
    noise, labels, negatives, rows = inputs
    null = np.full_like(labels, data.num_classes)
    out = {}
    for name in names:
        for kind, uncond in zip(KINDS, (null, negatives)):
            if kind == "null" and pool is not None:
                out[(name, kind)] = pool[(name, w)][rows]
                continue
            out[(name, kind)] = sample_in_batches(predictors[name], noise, labels, w, settings[name], uncond,
                                                  int(cfg.sampler.batch_size), seed=int(cfg.seed) + 1,
                                                  across_ranks=across_ranks)
    return out


def negative_metrics(feats: np.ndarray, probs: np.ndarray, labels: np.ndarray, negatives: np.ndarray,
                     real_feats: np.ndarray) -> dict[str, float]:
    """FD to the real images of the target classes, target accuracy, the negative class's mean probability and
    mean log-probability (which still shows the push where the probabilities are all near zero)."""
    p_neg = probs[np.arange(len(labels)), negatives]
    return {"fd": frechet_distance(feats, real_feats), "accuracy": accuracy(probs.argmax(axis=1), labels),
            "negative_probability": float(p_neg.mean()),
            "negative_log_probability": float(np.log(np.maximum(p_neg, 1e-30)).mean())}


def guidance_push(entry: dict[str, dict[str, float]]) -> float:
    """How far guiding away from the negative class lowered its log-probability against the null-class
    samples from the same noise, in nats (negative where w < 1 pulls towards it; 0 at w = 1)."""
    return entry["null"]["negative_log_probability"] - entry["negative"]["negative_log_probability"]


def evaluate_negatives(cfg: DictConfig, data: ImageData, clf: EvalClassifier, plan: NegativePlan,
                       predictors: dict[str, Predictor], settings: dict[str, SamplerSettings], out: Path,
                       stem: Any, across_ranks: bool = False, pool: NullPool | None = None) -> dict[str, Any]:
    """The report's ``negative`` section for ``plan`` (:func:`negative_plan`); writes
    ``samples/<model>_neg<K>_w<w>.npz`` and ``negative_w<w>.png``. ``stem(name, steps)`` names files.
    ``pool``: the main evaluation's samples (:func:`null_pool`), the null-class samples of the comparison."""
    pairs, names = plan
    per_pair = int(cfg.eval.negative_samples)
    inputs = negative_inputs(pairs, per_pair, data.image_shape, int(cfg.seed), data.num_classes)
    _, labels, negatives, _ = inputs
    targets = sorted({y for y, _ in pairs})
    real_feats, _ = features_and_probabilities(clf, data.test_images[np.isin(data.test_labels, targets)])
    section: dict[str, Any] = {"pairs": [list(p) for p in pairs], "samples_per_pair": per_pair,
                               "bars": {"fd_ratio": FD_BAR, "negative_probability_rel": PROB_BAR, "max_w": MAX_BAR_W},
                               "null_samples": "main evaluation" if pool is not None else "drawn",
                               "models": {n: {"per_w": {}} for n in names}}
    for w in [float(w) for w in cfg.eval.ws]:
        images = draw_negative_samples(cfg, data, inputs, names, predictors, settings, w, across_ranks, pool)
        rows = []
        for name in names:
            steps = settings[name].num_steps
            entry = {}
            for kind in KINDS:
                feats, probs = features_and_probabilities(clf, images[(name, kind)])
                entry[kind] = negative_metrics(feats, probs, labels, negatives, real_feats)
                rows.append((f"{name} ({steps} steps) {kind}", images[(name, kind)][::per_pair // 4 or 1][:4 * len(pairs)]))
            entry["push"] = guidance_push(entry)
            for k in sorted({k for _, k in pairs}):
                pick = negatives == k
                save_samples_npz(out / "samples" / f"{stem(name, steps)}_neg{k}_w{w:g}.npz",
                                 images[(name, "negative")][pick], labels[pick], w=w, model=name, steps=steps,
                                 negative_class=k)
            section["models"][name]["per_w"][str(w)] = entry
        save_side_by_side_png(rows, out / f"negative_w{w:g}.png")
        teacher = section["models"]["teacher"]["per_w"][str(w)]["negative"]
        for name in names[1:]:
            entry = section["models"][name]["per_w"][str(w)]
            entry.update(student_vs_teacher(entry["negative"], teacher))
        log.info("evaluate: negative classes, w=%g %s", w, "  ".join(
            f"{n} fd={section['models'][n]['per_w'][str(w)]['negative']['fd']:.2f} "
            f"p(neg)={section['models'][n]['per_w'][str(w)]['negative']['negative_probability']:.3f} "
            f"(null {section['models'][n]['per_w'][str(w)]['null']['negative_probability']:.3f})" for n in names))
    for name in names[1:]:
        section["models"][name].update(bar_verdict(section["models"][name]["per_w"]))
    return section


def bar_verdict(per_w: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``within_bars`` (every w <= MAX_BAR_W meets both bars) and ``outside_bars``: the ws at which each bar fails."""
    barred = {w: m for w, m in per_w.items() if float(w) <= MAX_BAR_W}
    outside = {"fd_ratio": [float(w) for w, m in barred.items() if m["fd_ratio"] > FD_BAR],
               "negative_probability_ratio": [float(w) for w, m in barred.items()
                                              if abs(m["negative_probability_ratio"] - 1.0) > PROB_BAR]}
    return {"within_bars": not any(outside.values()), "outside_bars": outside}


def student_vs_teacher(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """The student's FD and negative-class probability relative to its teacher's, with the same negative class."""
    return {"fd_ratio": student["fd"] / max(teacher["fd"], 1e-12),
            "negative_probability_ratio": student["negative_probability"] / max(teacher["negative_probability"], 1e-12)}


def sample_negative_share(cfg: DictConfig, data: ImageData, plan: NegativePlan, predictors: dict[str, Predictor],
                          settings: dict[str, SamplerSettings], pool: NullPool | None = None) -> None:
    """A worker other than rank 0: the sampler calls of :func:`evaluate_negatives` in the same order."""
    pairs, names = plan
    inputs = negative_inputs(pairs, int(cfg.eval.negative_samples), data.image_shape, int(cfg.seed),
                             data.num_classes)
    for w in [float(w) for w in cfg.eval.ws]:
        draw_negative_samples(cfg, data, inputs, names, predictors, settings, w, True, pool)
