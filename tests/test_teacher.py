"""Teacher: backbone shapes, CFG training (loss falls, resume is exact), checkpoints and errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import mindspore as ms
import pytest

from conftest import compose_cfg
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.training import CHECKPOINT_NAME, Trainer
from distill.core.weights import net_state
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher
from distill.jobs.teacher import run_teacher
from teacher.objective import regression_loss, teacher_batch_maker
from teacher.unet import UNet, UNetConfig

TINY_NET = UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=True, image_size=8, num_classes=3)


def _inputs(b: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = ms.Tensor(rng.standard_normal((b, 1, 8, 8)).astype(np.float32))
    t = ms.Tensor(rng.uniform(size=b).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 3, b).astype(np.int32))
    w = ms.Tensor(rng.uniform(0, 5, b).astype(np.float32))
    return z, t, y, w


def _randomize(net: UNet, seed: int = 1) -> None:
    # Zero-initialised output layers make an untrained net output 0 everywhere; perturb all weights.
    rng = np.random.default_rng(seed)
    for p in net.trainable_params():
        p.set_data(ms.Tensor((p.asnumpy() + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))


@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_unet_output_shape_and_class_dependence(scale_shift_norm: bool) -> None:
    net = UNet(dataclasses.replace(TINY_NET, scale_shift_norm=scale_shift_norm))
    _randomize(net)
    z, t, y, w = _inputs()
    out = net(z, t, y, w).asnumpy()
    assert out.shape == (4, 1, 8, 8)
    other = net(z, t, ms.Tensor(np.full(4, 3, np.int32)), w).asnumpy()  # null class
    assert not np.allclose(out, other)
    # the teacher ignores w
    np.testing.assert_array_equal(out, net(z, t, y, w * 0).asnumpy())


def test_guided_prediction_is_cfg_combination_of_two_passes() -> None:
    net = UNet(TINY_NET)
    _randomize(net)
    z, t, y, w = _inputs()
    null = ms.Tensor(np.full(4, 3, np.int32))
    cond, uncond = net(z, t, y, w).asnumpy(), net(z, t, null, w).asnumpy()
    guided = GuidedPrediction(net)(z, t, y, w, null).asnumpy()
    wn = w.asnumpy().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(guided, uncond + wn * (cond - uncond), rtol=1e-4, atol=1e-5)
    ones = ms.Tensor(np.ones(4, np.float32))
    np.testing.assert_allclose(GuidedPrediction(net)(z, t, y, ones, null).asnumpy(),
                               ConditionalPrediction(net)(z, t, y, ones, null).asnumpy(), rtol=1e-4, atol=1e-5)


def test_unet_rejects_image_size_it_cannot_halve() -> None:
    with pytest.raises(UserError, match="cannot be halved"):
        UNet(UNetConfig(image_size=7, channel_mult=(1, 2)))


def test_condition_dropout_rate_and_range_check() -> None:
    data = load_data({"name": "digits", "max_train": 200})
    make = teacher_batch_maker(data, 64, 0, 0, "cosine", "v", p_uncond=0.25)
    nulls = np.mean([np.mean(make(s)[2] == data.num_classes) for s in range(20)])
    assert 0.18 < nulls < 0.32
    with pytest.raises(UserError, match="p_uncond"):
        teacher_batch_maker(data, 64, 0, 0, "cosine", "v", p_uncond=1.5)


def _tiny_trainer(tmp_path, steps: int, lr: float = 3e-3, **settings_overrides) -> Trainer:
    from distill.core.training import TrainSettings

    data = load_data({"name": "digits", "max_train": 64})
    cfg = UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=False, image_size=8, num_classes=10)
    settings = TrainSettings(steps=steps, batch_size=32, lr=lr, ema_decay=0.9, checkpoint_every=2, log_every=5,
                             **settings_overrides)
    ms.set_seed(0)
    net, ema = UNet(cfg), UNet(cfg)
    batches = lambda start: teacher_batch_maker(data, 32, 0, start, "cosine", "v", 0.1)  # noqa: E731
    return Trainer(net, ema, regression_loss, batches, settings, tmp_path, {"kind": "teacher", "model": cfg.to_dict()})


def test_teacher_loss_falls(tmp_path) -> None:
    losses = _tiny_trainer(tmp_path, steps=40).run()
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


def test_resumed_training_ends_with_the_same_weights(tmp_path) -> None:
    full = _tiny_trainer(tmp_path / "full", steps=4)
    full.run()
    part = _tiny_trainer(tmp_path / "part", steps=2)
    part.run()  # stops after writing its checkpoint at step 2
    resumed = _tiny_trainer(tmp_path / "part", steps=4)
    assert resumed.try_resume() and resumed.step == 2
    resumed.run()
    for k, v in net_state(full.net).items():
        np.testing.assert_array_equal(v, net_state(resumed.net)[k], err_msg=k)
    for k, v in net_state(full.ema).items():
        np.testing.assert_array_equal(v, net_state(resumed.ema)[k], err_msg=k)


def test_teacher_job_writes_checkpoint_samples_and_reloads(tiny_run) -> None:
    out = tiny_run / "teacher"
    assert (out / CHECKPOINT_NAME).is_file()
    samples = np.load(out / "samples_w2.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (20, 8, 8, 1)
    assert samples["labels"].shape == (20,)
    cfg = compose_cfg(tiny_run)
    net = load_teacher(cfg, load_data(cfg.data))
    assert net.config.channels == 8


def test_teacher_checkpoint_from_another_architecture_is_refused(tiny_run, tmp_path) -> None:
    cfg = compose_cfg(tmp_path, f"teacher.checkpoint={tiny_run / 'teacher' / CHECKPOINT_NAME}", "model.channels=16")
    with pytest.raises(UserError, match="another architecture"):
        run_teacher(cfg)


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    cfg = compose_cfg(tmp_path, f"teacher.checkpoint={bad}")
    with pytest.raises(UserError, match="corrupt"):
        run_teacher(cfg)


def test_rerun_on_a_finished_dir_does_not_retrain_or_overwrite(tiny_run) -> None:
    path = tiny_run / "teacher" / CHECKPOINT_NAME
    before = path.read_bytes()
    run_teacher(compose_cfg(tiny_run))
    assert path.read_bytes() == before


def test_learning_rate_warms_up_then_holds_or_follows_a_cosine_to_zero() -> None:
    from distill.core.training import learning_rate
    constant = [learning_rate(s, 1e-3, 100, warmup_steps=10) for s in range(100)]
    assert constant[0] == pytest.approx(1e-4) and constant[9] == pytest.approx(1e-3)
    assert constant[10:] == [1e-3] * 90
    cosine = [learning_rate(s, 1e-3, 100, warmup_steps=10, decay="cosine") for s in range(100)]
    assert cosine[:11] == pytest.approx(constant[:11])  # same warm-up, full lr at its end
    assert cosine[55] == pytest.approx(0.5e-3)           # half way through the decay
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:])) and 0 < cosine[-1] < 1e-6


def test_the_learning_rate_schedule_reaches_the_optimizer(tmp_path) -> None:
    # Adam's first update is about lr * sign(grad): a warm-up that starts at lr/1000 must move the
    # weights ~1000x less than no warm-up (it did not while the schedule wrote to a copy of the lr).
    def first_step_size(name: str, **overrides) -> float:
        trainer = _tiny_trainer(tmp_path / name, steps=1, **overrides)
        before = [p.asnumpy().copy() for p in trainer.net.trainable_params()]
        trainer.run()
        return max(float(np.abs(p.asnumpy() - b).max()) for p, b in zip(trainer.net.trainable_params(), before))

    plain, warm = first_step_size("plain"), first_step_size("warm", warmup_steps=1000)
    assert plain > 0 and 300 < plain / warm < 3000


def test_param_lr_scale_gives_matching_parameters_their_own_learning_rate(tmp_path) -> None:
    # On the first step only the zero-initialised output conv has a gradient, and Adam moves it by
    # about lr * sign(grad): with factor 10 on its prefix it must move ~10x as far (jitted step).
    def first_step(name: str, **overrides) -> dict[str, float]:
        trainer = _tiny_trainer(tmp_path / name, steps=1, **overrides)
        before = {k: v.copy() for k, v in net_state(trainer.net).items()}  # asnumpy may share memory
        trainer.run()
        return {k: float(np.abs(v - before[k]).max()) for k, v in net_state(trainer.net).items()}

    plain, scaled = first_step("plain"), first_step("scaled", param_lr_scale={"conv_out.": 10.0})
    assert plain["conv_out.weight"] > 0
    assert 9 < scaled["conv_out.weight"] / plain["conv_out.weight"] < 11
    assert {k: v for k, v in scaled.items() if not k.startswith("conv_out.")} == \
        {k: v for k, v in plain.items() if not k.startswith("conv_out.")}
    with pytest.raises(UserError, match="'conv_ot.' matches no parameter"):
        _tiny_trainer(tmp_path / "typo", steps=1, param_lr_scale={"conv_ot.": 10.0})


def test_lr_groups_take_the_first_matching_prefix_and_refuse_bad_factors() -> None:
    from distill.core.training import TrainSettings, lr_groups
    names = ["guidance_embed.fc1.weight", "guidance_gate.fc2.bias", "time_embed.fc1.weight"]
    assert lr_groups(names, {"guidance_embed.": 5.0, "guidance_": 2.0}) == [5.0, 2.0, 1.0]
    assert lr_groups(names, {}) == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match=r"param_lr_scale\['guidance_'\]"):
        TrainSettings(steps=10, batch_size=2, param_lr_scale={"guidance_": 0.0}).validate()


def test_unknown_lr_decay_is_refused() -> None:
    from distill.core.training import TrainSettings
    with pytest.raises(UserError, match="lr_decay 'linear'"):
        TrainSettings(steps=10, batch_size=2, lr_decay="linear").validate()
