"""Classifier guidance: the sampler on tiny random nets, the noise-aware classifier's training job, bad inputs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from conftest import compose_cfg
from distill.core import diffusion as dm
from distill.core.checkpoint import load_checkpoint, save_checkpoint
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.sampling import SamplerSettings, jit_predictor, sample
from teacher.guidance import ClassifierGuidedPrediction, ConditionalPrediction, GuidedPrediction
from teacher.loading import load_noisy_classifier, unet_config
from teacher.noisy_classifier import (LogProbGrad, NoisyClassifier, NoisyClassifierConfig, log_prob_of,
                                      noisy_accuracy)
from teacher.unet import UNet

B = 3


def _randomised(net, seed: int, scale: float):
    """Zero-initialised weights made random, so outputs depend on the class and on z."""
    rng = np.random.default_rng(seed)
    for name, p in net.parameters_and_names():
        if name.endswith("weight") and not p.asnumpy().any():
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * scale))
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = compose_cfg(tmp_path_factory.mktemp("run"))
    unet = _randomised(UNet(unet_config(cfg.model, load_data(cfg.data))), 1, 0.2)
    clf = _randomised(NoisyClassifier(NoisyClassifierConfig(width=8, groups=4)), 2, 0.1)
    return {"unet": unet, "classifier": clf, "cfg": jit_predictor(GuidedPrediction(unet)),
            "guided": jit_predictor(ClassifierGuidedPrediction(unet, clf)),
            "student": jit_predictor(ConditionalPrediction(unet))}


def _inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    noise = np.random.default_rng(seed).standard_normal((B, 1, 8, 8)).astype(np.float32)
    return noise, np.array([3, 7, 1], np.int32), np.full(B, 10, np.int32)


CG = {"ddim-v-clip": SamplerSettings(num_steps=3, guidance="classifier"),
      "ddpm-eps-threshold": SamplerSettings(num_steps=3, kind="ddpm", prediction="eps", dynamic_threshold=0.9,
                                            guidance="classifier")}


@pytest.mark.parametrize("name", list(CG))
def test_scale_0_is_the_unconditional_sampler(nets: dict, name: str) -> None:
    """On the step engine (the eager one gives its images: the next test)."""
    noise, labels, unc = _inputs(0)
    settings = CG[name]
    uncond = sample(nets["cfg"], noise, labels, 0.0, dataclasses.replace(settings, guidance="cfg"), unc, seed=2)
    np.testing.assert_allclose(sample(nets["guided"], noise, labels, 0.0, settings, unc, seed=2), uncond,
                               atol=1e-5, rtol=0)
    guided = sample(nets["guided"], noise, labels, 4.0, settings, unc, seed=2)
    assert np.abs(guided - uncond).max() > 1e-3  # the gradient reaches the images, so the test can fail


@pytest.mark.parametrize("name", list(CG))
def test_compiled_step_equals_eager(nets: dict, name: str) -> None:
    noise, labels, unc = _inputs(1)
    eager = sample(nets["guided"], noise, labels, 3.0, dataclasses.replace(CG[name], engine="eager"), unc, seed=4)
    step = sample(nets["guided"], noise, labels, 3.0, CG[name], unc, seed=4)
    np.testing.assert_allclose(step, eager, atol=1e-5, rtol=0)
    other = sample(nets["guided"], noise, np.array([0, 2, 5], np.int32), 3.0, CG[name], unc, seed=4)
    assert np.abs(other - step).max() > 1e-3  # the labels steer the samples


@pytest.mark.slow
def test_compiled_loop_equals_eager(nets: dict) -> None:
    noise, labels, unc = _inputs(2)
    settings = CG["ddim-v-clip"]
    eager = sample(nets["guided"], noise, labels, 3.0, dataclasses.replace(settings, engine="eager"), unc)
    loop = sample(nets["guided"], noise, labels, 3.0, dataclasses.replace(settings, engine="loop"), unc)
    # The classifier's gradient inside one graph of the whole loop may sum in another order than eager
    # calls: up to 1e-4 seen after other tests in the same process (1e-5 alone); a wrong step or
    # gradient moves these images by more than 1e-3 (test_scale_0_is_the_unconditional_sampler).
    np.testing.assert_allclose(loop, eager, atol=2e-4, rtol=0)


def _log_p(clf: NoisyClassifier, z: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    return log_prob_of(clf(ms.Tensor(z.astype(np.float32)), ms.Tensor(t)), ms.Tensor(y)).asnumpy().astype(np.float64)


def test_the_guidance_direction_raises_log_p_of_the_class(nets: dict) -> None:
    """The gradient is grad_z log p(y | z, t) (a central difference along a random direction), and the guided
    sampler's change of x0 (what eps - s sigma grad does to the DDIM step at fixed z) raises log p(y)."""
    clf, rng = nets["classifier"], np.random.default_rng(3)
    z = rng.standard_normal((B, 1, 8, 8)).astype(np.float32)
    t, y = np.array([0.3, 0.5, 0.7], np.float32), np.array([3, 7, 1], np.int32)
    grad = LogProbGrad(clf)(ms.Tensor(z), clf.embed(ms.Tensor(t)), ms.Tensor(y)).asnumpy().astype(np.float64)
    u, h = rng.standard_normal(z.shape), 1e-2
    numeric = (_log_p(clf, z + h * u, t, y) - _log_p(clf, z - h * u, t, y)) / (2 * h)
    np.testing.assert_allclose(numeric, (grad * u).sum(axis=(1, 2, 3)), rtol=0.05, atol=1e-4)
    alpha, sigma = (a.reshape(-1, 1, 1, 1).astype(np.float64) for a in dm.alpha_sigma(dm.logsnr_schedule("cosine", t)))
    out = rng.standard_normal(z.shape)  # any network output (v prediction)
    x0 = lambda s: dm.x0_eps_from_output(z, dm.classifier_guided_output(out, grad, alpha, sigma, s, "v"),  # noqa
                                         alpha, sigma, "v")[0]
    step = x0(1.0) - x0(0.0)
    np.testing.assert_allclose(step, sigma**2 / alpha * grad, rtol=1e-6, atol=1e-9)  # x0 moves along +grad
    small = 1e-2 / np.abs(step).max()
    assert (_log_p(clf, z + small * step, t, y) > _log_p(clf, z, t, y)).all()
    assert (_log_p(clf, z - small * step, t, y) < _log_p(clf, z, t, y)).all()


# ----------------------------------------------------------------------------- the noise-aware classifier's job
# about 13 s on 2 cores: the fewest steps after which the accuracy at t = 0.3 is clearly above chance
CLASSIFIER_RUN = ("data.max_train=512", "classifier.width=16", "classifier.groups=4", "classifier.train.steps=100",
                  "classifier.train.batch_size=64", "classifier.train.lr=4e-3", "classifier.train.lr_decay=constant",
                  "classifier.train.warmup_steps=0", "classifier.train.ema_decay=0", "classifier.train.checkpoint_every=100",
                  "classifier.train.log_every=50", "classifier.check.ts=[0.3]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill.jobs.classifier import run_classifier

    run = tmp_path_factory.mktemp("classifier_run")
    run_classifier(compose_cfg(run, *CLASSIFIER_RUN))
    return run


@pytest.mark.slow
def test_the_noise_aware_classifier_learns_the_classes_of_noisy_images(trained: Path) -> None:
    import json

    from teacher.loading import classifier_config

    cfg = compose_cfg(trained, *CLASSIFIER_RUN)
    data = load_data(cfg.data)
    report = json.loads((trained / "classifier" / "report.json").read_text())
    untrained = NoisyClassifier(classifier_config(cfg.classifier, data))
    untrained.set_train(False)
    before = noisy_accuracy(untrained, data.test_images, data.test_labels, 0.3, "cosine", 0)
    after = report["accuracy"]["0.3"]
    assert after == pytest.approx(noisy_accuracy(load_noisy_classifier(cfg, data), data.test_images,
                                                 data.test_labels, 0.3, "cosine", 0), abs=1e-4)
    assert before < 0.25 and after > before + 0.3, (before, after)
    assert report["provenance"]["inputs"]["classifier"] and report["steps"] == 100


@pytest.mark.slow
def test_an_up_to_date_classifier_is_skipped_and_other_settings_are_refused(trained: Path) -> None:
    from distill.jobs.classifier import run_classifier

    ckpt = trained / "classifier" / "checkpoint.safetensors"
    stamps = (ckpt.stat().st_mtime_ns, (trained / "classifier" / "report.json").stat().st_mtime_ns)
    run_classifier(compose_cfg(trained, *CLASSIFIER_RUN))
    assert (ckpt.stat().st_mtime_ns, (trained / "classifier" / "report.json").stat().st_mtime_ns) == stamps
    with pytest.raises(UserError, match="was made with other settings: classifier.width 16 vs 8"):
        run_classifier(compose_cfg(trained, *CLASSIFIER_RUN, "classifier.width=8"))


# ----------------------------------------------------------------------------- bad inputs
def test_classifier_guidance_without_a_classifier_names_the_path_and_the_task(tmp_path: Path, nets: dict) -> None:
    from distill.jobs.common import teacher_prediction

    cfg = compose_cfg(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path}/classifier/checkpoint.safetensors not found \\(make it with "
                                        f"task=classifier"):
        teacher_prediction(cfg, load_data(cfg.data), nets["unet"], "classifier")


@pytest.mark.slow
@pytest.mark.parametrize("key, value, message", [
    ("num_classes", 5, "was trained for 5 classes of 1x8x8 images, the data has 10 classes of 1x8x8 images"),
    ("image_shape", [1, 16, 16], "was trained for 10 classes of 1x16x16 images, the data has 10 classes of 1x8x8"),
])
def test_a_classifier_of_other_data_is_refused(trained: Path, tmp_path: Path, key: str, value, message: str) -> None:
    tensors, meta = load_checkpoint(trained / "classifier" / "checkpoint.safetensors")
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, tensors, dict(meta, **{key: value}))
    cfg = compose_cfg(tmp_path, *CLASSIFIER_RUN, f"classifier.checkpoint={other}")
    with pytest.raises(UserError, match=message):
        load_noisy_classifier(cfg, load_data(cfg.data))


def test_bad_classifier_guidance_in_the_sampler(nets: dict) -> None:
    noise, labels, unc = _inputs(0)
    with pytest.raises(UserError, match="sampler: classifier guidance scale -1.0 must be a finite number >= 0"):
        sample(nets["guided"], noise, labels, -1.0, CG["ddim-v-clip"], unc)
    for model in ("student", "cfg"):  # a one-pass student, a CFG teacher: no classifier
        with pytest.raises(UserError, match="guidance=classifier needs the unconditional teacher with a noise-aware"):
            sample(nets[model], noise, labels, 1.0, CG["ddim-v-clip"], unc)
    with pytest.raises(UserError, match="a classifier-guided prediction samples with guidance=classifier"):
        sample(nets["guided"], noise, labels, 1.0, SamplerSettings(num_steps=2), unc)
    with pytest.raises(UserError, match="guidance_interval applies to cfg and cfgpp"):
        sample(nets["guided"], noise, labels, 1.0, dataclasses.replace(CG["ddim-v-clip"], guidance_interval=(0.2, 0.8)),
               unc)

