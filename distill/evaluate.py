"""``task=evaluate``: student vs teacher on the same noise, classes, sampler and w grid.

Per model and w: Frechet distance to held-out real images in the evaluation classifier's
features, class accuracy of the samples, and (student only) PSNR / MSE against the
teacher's sample from the same noise. The real-vs-real distance of two halves of the
held-out data is the floor. Speed: wall time per image with the same batch and steps.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from distill import build
from distill.classifier import EvalClassifier, features_and_predictions, load_or_train_classifier
from distill.data import ImageData, load_data
from distill.images import save_side_by_side_png, save_samples_npz
from distill.metrics import accuracy, frechet_distance, mean_psnr, mse
from distill.report import write_evaluation_report
from distill.sampling import jit_predictor

log = logging.getLogger(__name__)


def evaluation_classifier(cfg: DictConfig, data: ImageData) -> EvalClassifier:
    """The classifier whose features and predictions judge samples; trained once per run, cached."""
    path = build.run_dir(cfg) / "eval_classifier" / "classifier.safetensors"
    c = cfg.eval.classifier
    return load_or_train_classifier(path, data, steps=int(c.steps), batch_size=int(c.batch_size), seed=int(cfg.seed))


def real_floor(feats: np.ndarray, seed: int) -> float:
    """Frechet distance between two random halves of the held-out features."""
    perm = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    return frechet_distance(feats[perm[:half]], feats[perm[half:2 * half]])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def evaluation_models(cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """name -> jitted predictor: the two-pass teacher and the one-pass student."""
    from student.job import load_student
    from teacher.guidance import ConditionalPrediction, GuidedPrediction
    from teacher.job import load_teacher

    student_path = Path(str(cfg.eval.student)) if cfg.eval.get("student") else None
    student, _ = load_student(cfg, data, student_path)
    return {"teacher": GuidedPrediction(load_teacher(cfg, data)), "student": ConditionalPrediction(student)}


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    from tensorboardX import SummaryWriter
    from teacher.job import guided_samples

    data = load_data(cfg.data)
    out = build.run_dir(cfg) / "evaluate"
    clf = evaluation_classifier(cfg, data)
    cells = evaluation_models(cfg, data)
    predictors = {name: jit_predictor(cell, bool(cfg.jit)) for name, cell in cells.items()}
    n, seed = int(cfg.eval.num_samples), int(cfg.seed)
    ws = [float(w) for w in cfg.eval.ws]
    real_feats, _ = features_and_predictions(clf, data.test_images)
    report: dict[str, Any] = {
        "num_samples": n, "sampler": build.plain(cfg.sampler), "ws": ws,
        "classifier_heldout_accuracy": float(getattr(clf, "heldout_accuracy", float("nan"))),
        "real_vs_real_fd": real_floor(real_feats, seed), "num_heldout": int(len(data.test_images)),
        "models": {name: {"passes": int(cell.passes), "per_w": {}} for name, cell in cells.items()},
        "agreement": {},
    }
    # Compile and warm up each predictor at the evaluation batch before anything is timed.
    warm = min(n, int(cfg.sampler.batch_size))
    for name, predict in predictors.items():
        guided_samples(predict, data, cfg, 1.0, warm, seed)
    seconds = {name: 0.0 for name in predictors}
    rows: list[tuple[str, np.ndarray]] = []
    samples_dir = out / "samples"
    for w in ws:
        images = {}
        for name, predict in predictors.items():
            (imgs, labels), dt = timed(lambda: guided_samples(predict, data, cfg, w, n, seed))
            seconds[name] += dt
            feats, pred = features_and_predictions(clf, imgs)
            images[name] = imgs
            report["models"][name]["per_w"][str(w)] = {
                "fd": frechet_distance(feats, real_feats), "accuracy": accuracy(pred, labels)}
            save_samples_npz(samples_dir / f"{name}_w{w:g}.npz", imgs, labels, w=w, model=name)
            rows.append((f"{name} w={w:g}", imgs[: 2 * data.num_classes]))
        report["agreement"][str(w)] = {"psnr": mean_psnr(images["student"], images["teacher"]),
                                       "mse": float(mse(images["student"], images["teacher"]).mean())}
        log.info("evaluate: w=%g %s", w, "  ".join(
            f"{m} fd={report['models'][m]['per_w'][str(w)]['fd']:.2f} acc={report['models'][m]['per_w'][str(w)]['accuracy']:.3f}"
            for m in predictors) + f"  psnr={report['agreement'][str(w)]['psnr']:.1f}dB")
    total = n * len(ws)
    steps = int(cfg.sampler.num_steps)
    for name in predictors:
        report["models"][name]["speed"] = {
            "seconds_per_image": seconds[name] / total, "images_per_s": total / seconds[name],
            "network_evals_per_image": steps * report["models"][name]["passes"],
            "batch_size": int(cfg.sampler.batch_size), "steps": steps}
    report["speedup"] = seconds["teacher"] / seconds["student"]
    grid = save_side_by_side_png(rows, out / "samples_side_by_side.png")
    with SummaryWriter(str(build.run_dir(cfg) / "tb")) as writer:
        write_evaluation_report(report, out, writer)
        writer.add_image("evaluate/side_by_side", np.asarray(Image.open(grid).convert("RGB")), 0, dataformats="HWC")
    log.info("evaluate: speed-up %.2fx (teacher %.4f s/image, student %.4f s/image); report in %s",
             report["speedup"], report["models"]["teacher"]["speed"]["seconds_per_image"],
             report["models"]["student"]["speed"]["seconds_per_image"], out)
    return report
