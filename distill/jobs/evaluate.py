"""``task=evaluate``: student vs teacher on the same noise, classes, sampler and w grid.

Per model and w: Frechet distance to held-out real images in the evaluation classifier's
features, class accuracy of the samples, and (student only) PSNR / MSE against the
teacher's sample from the same noise. The real-vs-real distance of two halves of the
held-out data is the floor. Speed: wall time per image with the same batch, each model at
its own number of sampling steps: the teacher at ``eval.teacher_steps`` (null = sampler.num_steps),
each student of ``eval.students`` at its own (e.g. progressive rounds at 8 and 4 steps).

Under msrun (``distributed=true``) every worker samples its share of each model's samples (by sample
index, :func:`distill.core.sampling.sample_in_batches`), and rank 0 gets them all, judges them and
writes the report: the same samples and metrics as one process.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from distill.core import build, provenance
from distill.core import diffusion as dm
from distill.core.classifier import features_and_predictions
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import check_name
from distill.core.images import save_side_by_side_png, save_samples_npz
from distill.core.metrics import accuracy, frechet_distance, mean_psnr, mse
from distill.core.report import write_evaluation_report
from distill.core.runtime import current, is_main, my_items
from distill.core.sampling import Predictor, SamplerSettings, jit_predictor, network_calls_per_image
from distill.jobs.common import evaluation_classifier, guided_samples, teacher_prediction
from distill.jobs.methods import eval_methods, evaluate_methods, sample_methods_share
from distill.jobs.negatives import (NegativePlan, NullPool, evaluate_negatives, negative_plan, null_pool,
                                    sample_negative_share)
from student.distill import describe_target, distill_target, input_interval
from student.loading import load_student, serving_student_path
from student.progressive import verified_rounds
from student.model import student_prediction
from teacher.guidance import GuidedPrediction
from teacher.loading import classifier_checkpoint_path, load_teacher, teacher_checkpoint_path

log = logging.getLogger(__name__)


def real_floor(feats: np.ndarray, seed: int) -> float:
    """Frechet distance between two random halves of the held-out features."""
    perm = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    return frechet_distance(feats[perm[:half]], feats[perm[half:2 * half]])


def judge(clf: Any, imgs: np.ndarray, labels: np.ndarray, real_feats: np.ndarray) -> dict[str, float]:
    """FD to the held-out features and class accuracy of samples, by the evaluation classifier."""
    feats, pred = features_and_predictions(clf, imgs)
    return {"fd": frechet_distance(feats, real_feats), "accuracy": accuracy(pred, labels)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def default_student_specs(cfg: DictConfig, data: ImageData) -> list[tuple[str, Path | None, int | None]]:
    """The run's one-pass students: stage one at ``sampler.num_steps``, then (``eval.progressive``)
    every round of the progressive plan at its own steps, each checked to descend from that student."""
    specs: list[tuple[str, Path | None, int | None]] = []
    steps = int(cfg.sampler.num_steps)
    specs.append((f"student_{steps}step", None, steps))
    if cfg.eval.get("progressive", True):
        for n, path in verified_rounds(cfg, data):
            specs.append((f"student_{n}step", path, n))
    return specs


def student_specs(cfg: DictConfig, data: ImageData) -> list[tuple[str, Path | None, int | None]]:
    """(name, checkpoint or None = the run's student, steps or None = its own) for each one-pass student
    (the run's student: the phase-two student with ``negative_phase.enabled``, :func:`serving_student_path`).

    ``eval.student`` (one path) or ``eval.students`` ({name, path, steps} each) name them; neither
    means :func:`default_student_specs`. A listed student without steps uses the ``sampling_steps``
    it was distilled for (progressive rounds), else ``sampler.num_steps``.
    """
    listed = cfg.eval.get("students") or []
    if cfg.eval.get("student") and listed:
        raise UserError("set eval.student (one student) or eval.students (several), not both")
    if cfg.eval.get("student"):
        return [("student", checked_path(str(cfg.eval.student), "eval.student"), int(cfg.sampler.num_steps))]
    if not listed:
        return default_student_specs(cfg, data)
    specs: list[tuple[str, Path | None, int | None]] = []
    for entry in listed:
        keys = set(entry) if hasattr(entry, "keys") else set()
        name = str(entry.get("name") or "") if keys else ""
        if not name or name == "teacher" or name in [n for n, _, _ in specs] or keys - {"name", "path", "steps"}:
            raise UserError(f"eval.students: each entry is a mapping {{name, path, steps}} with a unique name "
                            f"other than 'teacher', got {entry}")
        check_name(name, "eval.students")
        steps = entry.get("steps")
        if steps is not None and int(steps) < 1:
            raise UserError(f"eval.students: steps of '{name}' must be >= 1, got {steps}")
        path = checked_path(str(entry["path"]), f"eval.students '{name}'") if entry.get("path") else None
        specs.append((name, path, None if steps is None else int(steps)))
    return specs


def checked_path(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: checkpoint not found: {p}")
    return p


def evaluate_provenance(cfg: DictConfig, data: ImageData,
                        specs: list[tuple[str, Path | None, int | None]] | None = None) -> dict[str, Any]:
    """What the evaluation is made of: its settings, the data, the teacher's and every student's file."""
    specs = student_specs(cfg, data) if specs is None else specs
    inputs = {"data": provenance.data_digest(data), "teacher": provenance.file_digest(teacher_checkpoint_path(cfg))}
    if "classifier" in eval_methods(cfg):
        inputs["classifier"] = provenance.file_digest(classifier_checkpoint_path(cfg))
    inputs.update({name: provenance.file_digest(path or serving_student_path(cfg)) for name, path, _ in specs})
    return provenance.record(cfg, "evaluate", inputs)


def evaluation_models(cfg: DictConfig, data: ImageData, specs: list[tuple[str, Path | None, int | None]]
                      ) -> tuple[dict[str, tuple[Any, int]], tuple[str, tuple[float, float] | None],
                                 dict[str, tuple[float, float] | None]]:
    """(name -> (prediction cell, sampling steps): the two-pass teacher, then the one-pass students of ``specs``;
    the (target, interval) the students were distilled to, :func:`common_target`; each student's
    :func:`student.distill.input_interval`, the interval its w input follows)."""
    teacher_steps = cfg.eval.get("teacher_steps")
    models = {"teacher": (GuidedPrediction(load_teacher(cfg, data)),
                          int(cfg.sampler.num_steps if teacher_steps is None else teacher_steps))}
    targets, w_intervals = {}, {}
    for name, path, steps in specs:
        student, meta = load_student(cfg, data, path or serving_student_path(cfg))
        models[name] = (student_prediction(student),
                        int(steps or meta.get("sampling_steps") or cfg.sampler.num_steps))
        targets[name] = distill_target(meta)
        w_intervals[name] = input_interval(meta)
    return models, common_target(targets), w_intervals


def common_target(targets: dict[str, tuple[str, tuple[float, float] | None]]
                  ) -> tuple[str, tuple[float, float] | None]:
    """The one (target, interval) of the evaluated students (each is compared with the teacher sampled that
    way); students distilled to different targets are refused (evaluate them one target at a time)."""
    found = sorted(set(targets.values()), key=str)
    if len(found) > 1:
        raise UserError("evaluate: the students were distilled to different targets (" + "; ".join(
            f"{name}: {describe_target(*t)}" for name, t in targets.items()) + "); evaluate each target on its own "
            "with eval.student or eval.students")
    return found[0] if found else ("cfg", None)


def model_settings(cfg: DictConfig, models: dict[str, tuple[Any, int]],
                   target: tuple[str, tuple[float, float] | None],
                   w_intervals: dict[str, tuple[float, float] | None] | None = None) -> dict[str, SamplerSettings]:
    """Each model's sampler settings. Students distilled with ``target=interval`` are compared with the teacher
    guided only inside their interval, and are themselves sampled with the interval their w input follows
    (``w_intervals``, :func:`student.distill.input_interval`: w inside, 1 outside, as they were trained), or
    without one when they took w at every t (interval students from before ``interval_input``: one pass at the
    same w every step); ``sampler.guidance_interval``, if set, must then be that interval. Students
    distilled with ``target=cfgpp`` and the teacher all sample with CFG++ (the teacher in two passes, a student
    from its two heads in one)."""
    settings = {name: build.sampler_settings(cfg, steps) for name, (_, steps) in models.items()}
    if target[0] == "cfgpp":
        if settings["teacher"].guidance_interval is not None:
            raise UserError("evaluate: a CFG++ student (target=cfgpp) guides every step; set "
                            "sampler.guidance_interval=null")
        return {name: dataclasses.replace(s, guidance="cfgpp") for name, s in settings.items()}
    interval = target[1]
    if interval is None:
        return settings
    asked = settings["teacher"].guidance_interval
    if asked is not None and tuple(asked) != tuple(interval):
        raise UserError(f"evaluate: sampler.guidance_interval={list(asked)} is not the interval the students were "
                        f"distilled with ({list(interval)}); set sampler.guidance_interval=null or "
                        f"{list(interval)}")
    w_intervals = w_intervals or {}
    return {name: dataclasses.replace(s, guidance_interval=interval if name == "teacher" else w_intervals.get(name))
            for name, s in settings.items()}


def evaluation_scales(cfg: DictConfig, target: str) -> tuple[str, list[float]]:
    """(name, grid) of the guidance scales the models are compared at: CFG's ``eval.ws``, or for CFG++ students
    CFG++'s lambda over ``eval.cfgpp_lambdas``."""
    if target == "cfgpp":
        return "lambda", [dm.check_cfgpp_lambda(float(x), "eval.cfgpp_lambdas") for x in cfg.eval.cfgpp_lambdas]
    return "w", [float(w) for w in cfg.eval.ws]


def sample_stem(name: str, steps: int) -> str:
    """File-name stem of a model's samples: ``teacher_16step``, ``student_4step`` (steps added once)."""
    return name if re.search(rf"_{steps}step$", name) else f"{name}_{steps}step"


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    from tensorboardX import SummaryWriter

    data = load_data(cfg.data)
    out = build.run_dir(cfg) / "evaluate"
    specs = student_specs(cfg, data)  # bad entries and missing rounds fail before the classifier is trained
    models, target, w_intervals = evaluation_models(cfg, data, specs)  # so do unreadable or non-finite checkpoints
    negatives = negative_plan(cfg, data.num_classes, models)  # and bad negative-class pairs
    methods = eval_methods(cfg)  # and a bad guidance-method grid
    guided = (jit_predictor(teacher_prediction(cfg, data, models["teacher"][0].net, "classifier"), bool(cfg.jit))
              if "classifier" in methods else None)  # and a missing or mismatched noise-aware classifier
    clf = evaluation_classifier(cfg, data) if is_main() else None
    predictors, settings = warmed_predictors(cfg, data, models, model_settings(cfg, models, target, w_intervals))
    # the methods comparison starts from the configured sampler; the teacher's CFG samples are reused there
    # unless they were drawn with the students' interval
    method_base = build.sampler_settings(cfg, settings["teacher"].num_steps)
    reuse_cfg = settings["teacher"] == method_base
    scale, ws = evaluation_scales(cfg, target[0])
    pool = null_pool(cfg, negatives, settings, scale, data.num_classes)  # the negative comparison's null-class samples
    if not is_main():  # the other workers only draw their share of the samples
        return _sample_share(cfg, data, negatives, predictors, settings, guided, method_base, reuse_cfg, ws, pool)
    students = [name for name in models if name != "teacher"]
    n, seed = int(cfg.eval.num_samples), int(cfg.seed)
    real_feats, _ = features_and_predictions(clf, data.test_images)
    report: dict[str, Any] = {
        "provenance": evaluate_provenance(cfg, data, specs), "num_samples": n, "sampler": build.plain(cfg.sampler),
        "ws": ws, "scale": scale,
        "classifier_heldout_accuracy": float(getattr(clf, "heldout_accuracy", float("nan"))),
        "real_vs_real_fd": real_floor(real_feats, seed), "num_heldout": int(len(data.test_images)),
        "student_target": {"target": target[0], "interval": list(target[1]) if target[1] else None,
                           "teacher_interval": list(settings["teacher"].guidance_interval or ()) or None,
                           "student_intervals": {name: list(settings[name].guidance_interval or ()) or None
                                                 for name in models if name != "teacher"}},
        "models": {name: {"passes": int(cell.passes), "steps": steps, "per_w": {}}
                   for name, (cell, steps) in models.items()},
        "agreement": {},  # of the first student (the only one by default); every student has its own in per_w
    }
    workers = current().world_size
    report["data_parallel_workers"] = workers
    seconds = {name: 0.0 for name in predictors}
    rows: list[tuple[str, np.ndarray]] = []
    samples_dir = out / "samples"
    for w in ws:
        images, grid_rows = {}, []
        for name, predict in predictors.items():
            (imgs, labels), dt = timed(lambda: guided_samples(predict, data, cfg, w, n, seed, settings[name],
                                                              across_ranks=workers > 1))
            seconds[name] += dt
            images[name] = imgs
            keep_for_negatives(pool, negatives, name, w, imgs)
            metrics = judge(clf, imgs, labels, real_feats)
            if name != "teacher":  # student-vs-teacher agreement on the same noise
                metrics.update(psnr=mean_psnr(imgs, images["teacher"]), mse=float(mse(imgs, images["teacher"]).mean()))
            report["models"][name]["per_w"][str(w)] = metrics
            steps = settings[name].num_steps
            save_samples_npz(samples_dir / f"{sample_stem(name, steps)}_{scale}{w:g}.npz", imgs, labels, w=w,
                             model=name, steps=steps)
            grid_rows.append((f"{name} ({steps} steps)", imgs[: 2 * data.num_classes]))
            rows.append((f"{name} ({steps} steps) {scale}={w:g}", imgs[: 2 * data.num_classes]))
        save_side_by_side_png(grid_rows, out / f"grid_{scale}{w:g}.png")  # the models side by side on the same noise
        first = report["models"][students[0]]["per_w"][str(w)]
        report["agreement"][str(w)] = {"psnr": first["psnr"], "mse": first["mse"]}
        log.info("evaluate: %s=%g %s", scale, w, "  ".join(
            f"{m} fd={r['fd']:.2f} acc={r['accuracy']:.3f}" + (f" psnr={r['psnr']:.1f}dB" if "psnr" in r else "")
            for m, r in ((m, report["models"][m]["per_w"][str(w)]) for m in predictors)))
    total = n * len(ws)
    for name in predictors:
        steps = settings[name].num_steps
        report["models"][name]["speed"] = {
            "seconds_per_image": seconds[name] / total, "images_per_s": total / seconds[name],
            "network_evals_per_image": network_calls_per_image(settings[name], report["models"][name]["passes"]),
            "batch_size": int(cfg.sampler.batch_size), "steps": steps,
            "speedup": seconds["teacher"] / seconds[name]}
    report["speedup"] = report["models"][students[0]]["speed"]["speedup"]  # first student vs teacher
    methods = evaluate_methods(cfg, predictors["teacher"], method_base,
                               lambda imgs, labels: judge(clf, imgs, labels, real_feats),
                               report["models"]["teacher"]["per_w"] if reuse_cfg else None,
                               _method_draw(cfg, data, workers > 1), guided)
    if methods is not None:
        report["methods"] = methods
    if negatives is not None:
        report["negative"] = evaluate_negatives(cfg, data, clf, negatives, predictors, settings, out, sample_stem,
                                                workers > 1, pool)
    grid = save_side_by_side_png(rows, out / "samples_side_by_side.png")
    with SummaryWriter(str(build.run_dir(cfg) / "tb")) as writer:
        write_evaluation_report(report, out, writer)
        writer.add_image("evaluate/side_by_side", np.asarray(Image.open(grid).convert("RGB")), 0, dataformats="HWC")
    log.info("evaluate: teacher %d steps %.4f s/image; %s; report in %s", settings["teacher"].num_steps,
             report["models"]["teacher"]["speed"]["seconds_per_image"], "; ".join(
                 f"{m} {settings[m].num_steps} steps {report['models'][m]['speed']['seconds_per_image']:.4f} s/image "
                 f"(speed-up {report['models'][m]['speed']['speedup']:.2f}x)" for m in students), out)
    return report


def warmed_predictors(cfg: DictConfig, data: ImageData, models: dict[str, tuple[Any, int]],
                      settings: dict[str, SamplerSettings] | None = None
                      ) -> tuple[dict[str, Predictor], dict[str, SamplerSettings]]:
    """Each model's compiled predictor and sampler settings (``settings``, default the config's at each model's
    steps), compiled and warmed up at the evaluation batch (in this process alone) before anything is timed."""
    predictors = {name: jit_predictor(cell, bool(cfg.jit)) for name, (cell, _) in models.items()}
    if settings is None:
        settings = {name: build.sampler_settings(cfg, steps) for name, (_, steps) in models.items()}
    warm = min(int(cfg.eval.num_samples), int(cfg.sampler.batch_size))
    for name, predict in predictors.items():
        guided_samples(predict, data, cfg, 1.0, warm, int(cfg.seed), settings[name])
    return predictors, settings


def keep_for_negatives(pool: NullPool | None, plan: NegativePlan | None, name: str, w: float,
                       imgs: np.ndarray) -> None:
    """Keep a model's samples at ``w`` in ``pool`` (:func:`distill.jobs.negatives.null_pool`) if the
    negative-class comparison takes its null-class samples from them."""
    if pool is not None and plan is not None and name in plan[1]:
        pool[(name, w)] = imgs


def _method_draw(cfg: DictConfig, data: ImageData, across_ranks: bool) -> Any:
    """(predict, settings, scale) -> (images, labels) on the evaluation's noise and classes."""
    n, seed = int(cfg.eval.num_samples), int(cfg.seed)
    return lambda predict, settings, scale: guided_samples(predict, data, cfg, scale, n, seed, settings,
                                                           across_ranks=across_ranks)


def _sample_share(cfg: DictConfig, data: ImageData, negatives: NegativePlan | None,
                  predictors: dict[str, Predictor], settings: dict[str, SamplerSettings],
                  guided: Predictor | None, method_base: SamplerSettings, reuse_cfg: bool, ws: list[float],
                  pool: NullPool | None) -> None:
    """A worker other than rank 0: the sampler calls of rank 0 in the same order (w by w, model by
    model), drawing its own share of each; rank 0 judges and writes."""
    n, seed = int(cfg.eval.num_samples), int(cfg.seed)
    for w in ws:
        for name, predict in predictors.items():
            imgs, _ = guided_samples(predict, data, cfg, w, n, seed, settings[name], across_ranks=True)
            keep_for_negatives(pool, negatives, name, w, imgs)
    sample_methods_share(cfg, predictors["teacher"], method_base, _method_draw(cfg, data, True), guided, reuse_cfg)
    if negatives is not None:
        sample_negative_share(cfg, data, negatives, predictors, settings, pool)
    chunks = -(-n // int(cfg.sampler.batch_size))
    log.info("evaluate: rank %d drew %d of %d sample chunks per model and w", current().rank,
             len(my_items(chunks)), chunks)
