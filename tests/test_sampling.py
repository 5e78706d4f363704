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
from distill.core.sampling import Predictor, SamplerSettings, ServingSampler, jit_predictor, sample, sample_in_batches
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


# ----------------------------------------------------------------------------- CFG++ and the guidance interval
@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """A tiny two-pass teacher whose zero-initialised layers are random, so its output depends on the class."""
    cfg = compose_cfg(tmp_path_factory.mktemp("run"))
    net = UNet(unet_config(cfg.model, load_data(cfg.data)))
    rng = np.random.default_rng(1)
    for name, p in net.parameters_and_names():
        if name.endswith("weight") and not p.asnumpy().any():
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    net.set_train(False)
    return jit_predictor(GuidedPrediction(net))


GUIDED = {  # the teacher's guidance methods on every update and parametrisation
    "cfgpp-ddim-v-clip": SamplerSettings(num_steps=3, guidance="cfgpp"),
    "cfgpp-ddpm-eps-threshold": SamplerSettings(num_steps=3, kind="ddpm", prediction="eps", dynamic_threshold=0.9,
                                                guidance="cfgpp"),
    "interval-ddim-eps-clip": SamplerSettings(num_steps=3, prediction="eps", guidance_interval=(0.5, 0.9)),
    "interval-cfgpp-ddpm-v": SamplerSettings(num_steps=3, kind="ddpm", guidance="cfgpp", guidance_interval=(0.1, 0.7)),
}


def _eager(settings: SamplerSettings) -> SamplerSettings:
    return dataclasses.replace(settings, engine="eager")


@pytest.mark.parametrize("name", list(GUIDED))
def test_guidance_methods_compiled_step_equals_eager(teacher: Predictor, name: str) -> None:
    noise, labels, unc = _inputs(5)
    settings = GUIDED[name]
    eager = sample(teacher, noise, labels, 0.7, _eager(settings), unc, seed=3)
    step = sample(teacher, noise, labels, 0.7, settings, unc, seed=3)
    np.testing.assert_allclose(step, eager, atol=1e-5, rtol=0)
    plain = sample(teacher, noise, labels, 0.7, dataclasses.replace(
        settings, guidance="cfg", guidance_interval=None), unc, seed=3)
    assert np.abs(step - plain).max() > 1e-3  # the method changes the images


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cfgpp-ddim-v-clip", "interval-cfgpp-ddpm-v"])
def test_guidance_methods_compiled_loop_equals_eager(teacher: Predictor, name: str) -> None:
    noise, labels, unc = _inputs(6)
    settings = GUIDED[name]
    eager = sample(teacher, noise, labels, 0.4, _eager(settings), unc, seed=1)
    loop = sample(teacher, noise, labels, 0.4, dataclasses.replace(settings, engine="loop"), unc, 1)
    np.testing.assert_allclose(loop, eager, atol=1e-5, rtol=0)


def test_cfgpp_update_is_the_papers(teacher: Predictor) -> None:
    """Three DDIM steps by hand (v prediction, no clipping): x0 from the guided output, the re-noising with
    the unconditional eps (Chung et al. 2024, Algorithm 1: z_s = alpha_s x0(guided) + sigma_s eps(uncond)).
    (At t = 1, alpha = 0, every eps is z: the steps after the first tell the methods apart.)"""
    from distill.core.sampling import step_times

    noise, labels, unc = _inputs(7)
    lam = 0.6
    settings = SamplerSettings(num_steps=3, clip_x0=False, guidance="cfgpp")
    z = noise.astype(np.float64)
    for t, _, a_t, s_t, a_s, s_s in step_times(settings):
        args = (ms.Tensor(np.full(B, t, np.float32)), ms.Tensor(labels), ms.Tensor(np.full(B, lam, np.float32)),
                ms.Tensor(unc))
        cond, uncond = (o.asnumpy().astype(np.float64) for o in teacher.branches(ms.Tensor(z.astype(np.float32)), *args))
        x0 = a_t * z - s_t * (uncond + lam * (cond - uncond))  # x0 = alpha z - sigma v
        z = a_s * x0 + s_s * (s_t * z + a_t * uncond)  # eps = sigma z + alpha v
    expected = np.clip(z, -1, 1)
    assert np.mean(np.abs(expected) < 1) > 0.3  # mostly unclipped, so the comparison sees the update
    for engine in ("eager", "step"):
        got = sample(teacher, noise, labels, lam, dataclasses.replace(settings, engine=engine), unc)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    cfg = sample(teacher, noise, labels, lam, dataclasses.replace(settings, guidance="cfg"), unc)
    assert np.abs(cfg - expected).max() > 1e-3


@pytest.mark.parametrize("kind, prediction", [("ddim", "v"), ("ddpm", "eps")])
def test_cfgpp_at_lambda_0_is_the_unconditional_sampler(teacher: Predictor, kind: str, prediction: str) -> None:
    noise, labels, unc = _inputs(8)
    settings = SamplerSettings(num_steps=3, kind=kind, prediction=prediction)  # x0 clipped (the default)
    uncond = sample(teacher, noise, labels, 0.0, settings, unc, seed=2)  # CFG at w = 0
    cfgpp = sample(teacher, noise, labels, 0.0, dataclasses.replace(settings, guidance="cfgpp"), unc, 2)
    np.testing.assert_allclose(cfgpp, uncond, atol=1e-5, rtol=0)  # DDPM: z_t rebuilt from x0 and eps, rounded
    conditional = sample(teacher, noise, labels, 1.0, settings, unc, seed=2)
    assert np.abs(conditional - uncond).max() > 1e-3  # the two branches differ, so the test can fail


@pytest.mark.parametrize("engine", ["step", "eager"])
def test_an_interval_over_all_times_is_cfg_and_one_outside_them_is_the_conditional_sampler(
        teacher: Predictor, engine: str) -> None:
    noise, labels, unc = _inputs(9)
    settings = SamplerSettings(num_steps=3, engine=engine)  # step times 1, 2/3, 1/3
    cfg = sample(teacher, noise, labels, 3.0, settings, unc)
    everywhere = sample(teacher, noise, labels, 3.0, dataclasses.replace(settings, guidance_interval=(0.0, 1.0)), unc)
    np.testing.assert_allclose(everywhere, cfg, atol=1e-6, rtol=0)
    conditional = sample(teacher, noise, labels, 1.0, settings, unc)
    nowhere = sample(teacher, noise, labels, 3.0, dataclasses.replace(settings, guidance_interval=(0.4, 0.6)), unc)
    np.testing.assert_allclose(nowhere, conditional, atol=1e-5, rtol=0)
    assert np.abs(cfg - conditional).max() > 1e-3


def test_network_calls_per_image_are_counted(teacher: Predictor) -> None:
    """The function's count against the rows the network really ran through, per image."""
    from distill.core.sampling import guided_steps, network_calls_per_image

    settings = SamplerSettings(num_steps=3, engine="eager", guidance_interval=(0.5, 1.0))  # guides t = 1 and 2/3
    assert list(guided_steps(settings)) == [True, True, False]
    assert network_calls_per_image(settings, 2) == 2 + 2 + 1
    assert network_calls_per_image(dataclasses.replace(settings, guidance_interval=None), 2) == 6
    assert network_calls_per_image(settings, 1) == 3
    noise, labels, unc = _inputs(10)
    net = teacher.cell.net
    rows = []
    original = net.construct
    net.construct = lambda x, *a: rows.append(x.shape[0]) or original(x, *a)
    try:
        for s in (settings, dataclasses.replace(settings, guidance="cfgpp")):
            rows.clear()
            sample(jit_predictor(teacher.cell, use_jit=False), noise, labels, 0.5, s, unc)
            assert sum(rows) / B == network_calls_per_image(s, 2)
    finally:
        del net.construct


@pytest.mark.parametrize("settings, w, match", [
    (SamplerSettings(num_steps=2, guidance="cfgpp"), 1.5, "CFG\\+\\+ lambda 1.5 must be a number in \\[0, 1\\]"),
    (SamplerSettings(num_steps=2, guidance="cfgpp"), -0.1, "lambda -0.1"),
    (SamplerSettings(num_steps=2, guidance="cfg++"), 1.0, "unknown guidance 'cfg\\+\\+'"),
    (SamplerSettings(num_steps=2, guidance_interval=(0.6, 0.6)), 1.0, "0 <= t_lo < t_hi <= 1"),
    (SamplerSettings(num_steps=2, guidance_interval=(0.2, 1.5)), 1.0, "0 <= t_lo < t_hi <= 1"),
])
def test_bad_guidance_settings_are_user_errors(teacher: Predictor, settings: SamplerSettings, w: float,
                                               match: str) -> None:
    noise, labels, unc = _inputs()
    with pytest.raises(UserError, match=match):
        sample(teacher, noise, labels, w, settings, unc)


def test_cfgpp_on_the_one_pass_student_is_a_user_error(predictors: dict) -> None:
    noise, labels, unc = _inputs()
    for engine in ("step", "eager"):
        with pytest.raises(UserError, match="guidance=cfgpp needs the two-pass teacher"):
            sample(predictors["student"], noise, labels, 0.5, SamplerSettings(num_steps=2, guidance="cfgpp",
                                                                              engine=engine), unc)
