"""The compiled sampler engines against the eager reference, on tiny random nets and seeded noise."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from conftest import compose_cfg
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.sampling import SamplerSettings, ServingSampler, jit_predictor, sample, sample_in_batches
from student.model import student_from_teacher
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import unet_config
from teacher.unet import UNet

B = 3


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny teacher (two passes) and a student whose guidance layers are not zero (so w matters)."""
    cfg = compose_cfg(tmp_path_factory.mktemp("run"))
    data = load_data(cfg.data)
    teacher = UNet(unet_config(cfg.model, data))
    student = student_from_teacher(teacher, 8, 1000.0, class_gate=True, film=True)
    rng = np.random.default_rng(0)
    for name, p in student.parameters_and_names():
        if "guidance" in name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    for net in (teacher, student):
        net.set_train(False)
    return {"teacher": jit_predictor(GuidedPrediction(teacher)), "student": jit_predictor(ConditionalPrediction(student))}


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    noise = np.random.default_rng(seed).standard_normal((B, 1, 8, 8)).astype(np.float32)
    return noise, np.arange(B, dtype=np.int32) % 10, np.full(B, 10, np.int32)


SETTINGS = {  # (kind, eta, prediction, w schedule, clip, dynamic threshold, steps)
    "ddim-v-clip": SamplerSettings(num_steps=3),
    "ddim-eps-linear-noclip": SamplerSettings(num_steps=2, prediction="eps", w_schedule="linear", clip_x0=False),
    "ddpm-v-cosine-threshold": SamplerSettings(num_steps=3, kind="ddpm", w_schedule="cosine", dynamic_threshold=0.9),
    "ddim-eta-eps-threshold": SamplerSettings(num_steps=3, eta=0.5, prediction="eps", dynamic_threshold=0.95),
}


@pytest.mark.parametrize("model", ["teacher", "student"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_compiled_step_equals_eager(predictors: dict, model: str, name: str) -> None:
    noise, labels, unc = _inputs()
    settings = SETTINGS[name]
    eager = sample(predictors[model], noise, labels, 2.5, dataclasses.replace(settings, engine="eager"), unc, seed=4)
    step = sample(predictors[model], noise, labels, 2.5, settings, unc, seed=4)
    np.testing.assert_allclose(step, eager, atol=1e-5, rtol=0)
    if settings.kind == "ddpm":  # the step noise is the eager sampler's stream: another seed, other images
        other = sample(predictors[model], noise, labels, 2.5, settings, unc, seed=5)
        assert np.abs(other - step).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim-v-clip", "ddpm-v-cosine-threshold"])
def test_compiled_loop_equals_eager_and_recompiles_per_step_count(predictors: dict, name: str) -> None:
    noise, labels, unc = _inputs(1)
    for steps in (2, 3):  # a second step count builds a second graph, never reuses the first
        settings = dataclasses.replace(SETTINGS[name], num_steps=steps)
        eager = sample(predictors["student"], noise, labels, 1.5, dataclasses.replace(settings, engine="eager"), unc, 2)
        loop = sample(predictors["student"], noise, labels, 1.5, dataclasses.replace(settings, engine="loop"), unc, 2)
        np.testing.assert_allclose(loop, eager, atol=1e-5, rtol=0)


def test_plain_callable_runs_the_eager_path(predictors: dict) -> None:
    noise, labels, unc = _inputs(2)
    settings = SETTINGS["ddim-v-clip"]
    student = predictors["student"]
    via_function = sample(lambda *a: student(*a), noise, labels, 1.0, settings, unc)
    np.testing.assert_allclose(via_function, sample(student, noise, labels, 1.0, settings, unc), atol=1e-5, rtol=0)


def test_batches_pad_and_trim(predictors: dict) -> None:
    noise, labels, unc = _inputs(3)
    settings = SETTINGS["ddim-v-clip"]
    whole = sample(predictors["student"], noise, labels, 2.0, settings, unc)
    chunked = sample_in_batches(predictors["student"], noise, labels, 2.0, settings, unc, batch_size=2)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)  # one image per sample: batch does not matter


@pytest.mark.parametrize("change, match", [({"num_steps": 0}, "num_steps 0 must be an integer >= 1"),
                                           ({"num_steps": -2}, "num_steps -2"),
                                           ({"engine": "fast"}, "unknown engine 'fast'")])
def test_bad_settings_are_user_errors(predictors: dict, change: dict, match: str) -> None:
    noise, labels, unc = _inputs()
    with pytest.raises(UserError, match=match):
        sample(predictors["student"], noise, labels, 1.0, dataclasses.replace(SETTINGS["ddim-v-clip"], **change), unc)


def test_empty_batch_is_a_user_error(predictors: dict) -> None:
    noise, labels, unc = _inputs()
    settings = SETTINGS["ddim-v-clip"]
    with pytest.raises(UserError, match="batch must be >= 1"):
        sample(predictors["student"], noise[:0], labels[:0], 1.0, settings, unc[:0])
    with pytest.raises(UserError, match="no images"):
        sample_in_batches(predictors["student"], noise[:0], labels[:0], 1.0, settings, unc[:0], batch_size=2)
    with pytest.raises(UserError, match="batch size 0"):
        sample_in_batches(predictors["student"], noise, labels, 1.0, settings, unc, batch_size=0)


def test_serving_sampler_refuses_stochastic_samplers(predictors: dict) -> None:
    with pytest.raises(UserError, match="only deterministic samplers"):
        ServingSampler(predictors["student"].cell, SETTINGS["ddpm-v-cosine-threshold"], 10)


def test_sampler_config_selects_the_engine(tmp_path: Path) -> None:
    from distill.core import build

    assert build.sampler_settings(compose_cfg(tmp_path)).engine == "step"  # compiled by default
    assert build.sampler_settings(compose_cfg(tmp_path, "sampler.engine=eager")).engine == "eager"
    with pytest.raises(UserError, match="unknown engine"):
        build.sampler_settings(compose_cfg(tmp_path, "sampler.engine=graph"))
