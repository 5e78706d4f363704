"""Guidance methods in ``task=evaluate`` (``eval.methods``): the two-pass teacher with CFG over ``eval.ws``,
CFG++ over ``eval.cfgpp_lambdas``, CFG guided only inside ``eval.interval`` over ``eval.ws``, and the
unconditional teacher with classifier guidance over ``eval.classifier_scales``, on the same noise and classes
as the teacher's evaluation. Per setting: FD, class accuracy, network calls per image (and classifier
forward+backward passes per image); one table (the report's ``methods`` section) and one trade-off plot.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from omegaconf import DictConfig

from distill.core import diffusion as dm
from distill.core.errors import UserError
from distill.core.sampling import Predictor, SamplerSettings, classifier_calls_per_image, network_calls_per_image

log = logging.getLogger(__name__)

METHODS = ("cfg", "cfgpp", "interval", "classifier")
# Tasks that sample a one-pass student with the config's sampler: CFG++ and classifier guidance cannot run there
# (CFG++ can in task=evaluate for a student distilled with student.target=cfgpp: its second head is the
# unconditional output).
STUDENT_SAMPLING_TASKS = ("evaluate", "bench", "publish", "sample", "pipeline")


def eval_methods(cfg: DictConfig) -> list[str]:
    """``eval.methods``, checked (known names, no repeats, at least one), with their grids."""
    methods = [str(m) for m in cfg.eval.get("methods", ["cfg"])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"eval.methods: unknown method '{unknown[0]}' (choose from {', '.join(METHODS)})")
    if not methods or len(set(methods)) != len(methods):
        raise UserError(f"eval.methods={methods}: give at least one method, each once")
    if "cfgpp" in methods:
        _check_grid(cfg.eval.cfgpp_lambdas, "eval.cfgpp_lambdas", dm.check_cfgpp_lambda, "CFG++ lambda, e.g. [0.6]")
    if "interval" in methods:
        dm.check_interval(list(cfg.eval.interval), "eval.interval")
    if "classifier" in methods:
        _check_grid(cfg.eval.classifier_scales, "eval.classifier_scales", dm.check_classifier_scale,
                    "classifier guidance scale, e.g. [2.0]")
    return methods


def _check_grid(values: Any, key: str, check: Callable[[float, str], float], example: str) -> None:
    scales = [float(x) for x in values]
    if not scales:
        raise UserError(f"{key} is empty: give at least one {example}")
    for scale in scales:
        check(scale, key)


def check_sampler_guidance(cfg: DictConfig) -> None:
    """``sampler.guidance`` and its scales; CFG++ and classifier guidance refused where a one-pass student would
    be sampled (CFG++ is allowed for the evaluation of a ``student.target=cfgpp`` student)."""
    dm.check_cfgpp_lambda(float(cfg.sampler.guidance_lambda), "sampler.guidance_lambda")
    dm.check_classifier_scale(float(cfg.sampler.classifier_scale), "sampler.classifier_scale")
    guidance, task = str(cfg.sampler.guidance), str(cfg.task)
    cfgpp_student = str(cfg.student.get("target", "cfg")) == "cfgpp"
    if guidance == "cfgpp" and task in STUDENT_SAMPLING_TASKS and not (cfgpp_student and task == "evaluate"):
        raise UserError(f"sampler.guidance=cfgpp cannot sample the one-pass student (task={task}): it has one "
                        f"output, CFG++ needs the guided x0 and the unconditional noise; compare CFG++ on the teacher "
                        f"with task=evaluate eval.methods=[cfg,cfgpp]")
    if guidance == "classifier" and task in STUDENT_SAMPLING_TASKS:
        raise UserError(f"sampler.guidance=classifier cannot sample the one-pass student (task={task}): it guides "
                        f"the unconditional teacher with a noise-aware classifier's gradient; compare it on the "
                        f"teacher with task=evaluate eval.methods=[cfg,classifier]")


def method_settings(cfg: DictConfig, base: SamplerSettings) -> dict[str, tuple[SamplerSettings, list[float]]]:
    """method -> (the teacher's sampler settings, its grid of guidance scales)."""
    ws = [float(w) for w in cfg.eval.ws]
    plans = {"cfg": (base, ws)}
    plans["cfgpp"] = (dataclasses.replace(base, guidance="cfgpp"), [float(x) for x in cfg.eval.cfgpp_lambdas])
    plans["interval"] = (dataclasses.replace(base, guidance_interval=dm.check_interval(list(cfg.eval.interval),
                                                                                        "eval.interval")), ws)
    plans["classifier"] = (dataclasses.replace(base, guidance="classifier", guidance_interval=None),
                           [float(x) for x in cfg.eval.classifier_scales])
    return {m: plans[m] for m in eval_methods(cfg)}


def scale_name(method: str) -> str:
    return {"cfgpp": "lambda", "classifier": "s"}.get(method, "w")


def evaluate_methods(cfg: DictConfig, predict: Predictor, base: SamplerSettings,
                     judge: Callable[[Any, Any], dict[str, float]], teacher_cfg: dict[str, dict[str, float]] | None,
                     draw: Callable[..., Any], guided: Predictor | None = None) -> dict[str, Any] | None:
    """The report's ``methods`` section, or None for ``eval.methods=[cfg]``.

    ``predict`` is the two-pass teacher, ``guided`` the same teacher with the noise-aware classifier (method
    ``classifier``; :class:`teacher.guidance.ClassifierGuidedPrediction`). ``teacher_cfg`` holds the teacher's CFG
    metrics per w (already measured on this noise, reused; None: drawn here, when the evaluation sampled the
    teacher otherwise, e.g. in an interval student's interval);
    ``draw(predict, settings, scale)`` gives (images, labels) on the evaluation's noise and classes and
    ``judge(images, labels)`` their FD and accuracy (the evaluation's own helpers)."""
    plans = method_settings(cfg, base)
    if list(plans) == ["cfg"]:
        return None
    section: dict[str, Any] = {"methods": {}}
    for method, (settings, scales) in plans.items():
        model = _predictor(method, predict, guided)
        calls = network_calls_per_image(settings, model.passes)
        per_scale = {}
        for scale in scales:  # cfg is the teacher's evaluation itself: reused, not drawn again
            metrics = (teacher_cfg[str(scale)] if method == "cfg" and teacher_cfg is not None
                       else judge(*draw(model, settings, scale)))
            per_scale[str(scale)] = {"fd": metrics["fd"], "accuracy": metrics["accuracy"]}
        section["methods"][method] = {"scale": scale_name(method), "scales": scales, "network_calls_per_image": calls,
                                      "classifier_calls_per_image": classifier_calls_per_image(settings),
                                      "interval": list(settings.guidance_interval or ()) or None,
                                      "per_scale": per_scale}
        log.info("evaluate: method %s (%d network calls per image) %s", method, calls, "  ".join(
            f"{scale_name(method)}={s:g} fd={per_scale[str(s)]['fd']:.2f} acc={per_scale[str(s)]['accuracy']:.3f}"
            for s in scales))
    return section


def _predictor(method: str, predict: Predictor, guided: Predictor | None) -> Predictor:
    if method != "classifier":
        return predict
    if guided is None:
        raise UserError("eval.methods: classifier guidance needs the teacher with its noise-aware classifier")
    return guided


def sample_methods_share(cfg: DictConfig, predict: Predictor, base: SamplerSettings, draw: Callable[..., Any],
                         guided: Predictor | None = None, reuse_cfg: bool = True) -> None:
    """A worker other than rank 0: the sampler calls of :func:`evaluate_methods` in the same order."""
    plans = method_settings(cfg, base)
    if list(plans) == ["cfg"]:
        return
    for method, (settings, scales) in plans.items():
        for scale in scales if method != "cfg" or not reuse_cfg else ():
            draw(_predictor(method, predict, guided), settings, scale)
