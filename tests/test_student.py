"""Student: zero-init equals the teacher, distillation loss falls, shards equal online targets."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest

from conftest import compose_cfg, copy_run, guidance_errors, random_teacher
from distill.core import diffusion as dm
from distill.core.data import load_data
from distill.core.errors import UserError
from student.distill import distill_inputs, guidance_loss_weight, regression_batch, sample_w, teacher_targets
from distill.jobs.distill import distill_batches, run_distill
from student.loading import load_student
from student.model import student_from_teacher
from distill.jobs.targets import run_targets
from student.targets import shard_reader
from teacher.guidance import GuidanceBranches, GuidedPrediction
from teacher.loading import load_teacher
from teacher.unet import UNet, UNetConfig


@pytest.mark.parametrize("class_gate,scale_shift_norm,film",
                         [(False, False, False), (True, False, False), (True, True, False), (True, False, True)])
def test_untrained_student_equals_teacher_conditional_prediction(class_gate: bool, scale_shift_norm: bool,
                                                                 film: bool) -> None:
    teacher = UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4, image_size=8, num_classes=10,
                              scale_shift_norm=scale_shift_norm))
    rng = np.random.default_rng(0)
    for p in teacher.trainable_params():  # non-trivial weights (output layers start at zero)
        p.set_data(ms.Tensor((p.asnumpy() + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    student = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, class_gate=class_gate, film=film)
    z = ms.Tensor(rng.standard_normal((6, 1, 8, 8)).astype(np.float32))
    t = ms.Tensor(rng.uniform(size=6).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 10, 6).astype(np.int32))
    w = ms.Tensor(np.array([0, 0.5, 1, 2, 4, 7], np.float32))
    np.testing.assert_array_equal(student(z, t, y, w).asnumpy(), teacher(z, t, y, w).asnumpy())
    # each zero-initialised guidance layer is really in the graph: perturbing it changes the output
    layers = [student.guidance_embed.fc2] + ([student.guidance_gate.fc2] if class_gate else []) \
        + ([student.mid1.guidance_film] if film else [])
    for layer in layers:
        saved = [p.asnumpy() for p in layer.trainable_params()]
        for p in layer.trainable_params():
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        assert not np.allclose(student(z, t, y, w).asnumpy(), teacher(z, t, y, w).asnumpy())
        for p, v in zip(layer.trainable_params(), saved):
            p.set_data(ms.Tensor(v))


def test_class_gate_at_minus_one_is_the_unconditional_model() -> None:
    """gate(w) = -1 turns every class into the null class: the w = 0 target is reachable exactly."""
    teacher = random_teacher()
    student = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, class_gate=True)
    bias = student.guidance_gate.fc2.bias
    bias.set_data(ms.Tensor(np.full(bias.shape, -1.0, np.float32)))
    rng = np.random.default_rng(2)
    z = ms.Tensor(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    t = ms.Tensor(rng.uniform(size=4).astype(np.float32))
    y = ms.Tensor(np.array([0, 3, 7, 9], np.int32))
    w = ms.Tensor(np.zeros(4, np.float32))
    null = ms.Tensor(np.full(4, 10, np.int32))
    np.testing.assert_allclose(student(z, t, y, w).asnumpy(), teacher(z, t, null, w).asnumpy(), atol=1e-6)


def test_class_ramp_makes_w0_unconditional_whatever_the_gate() -> None:
    """student.class_ramp=1: null + min(w, 1) (1 + gate(w)) (class - null). At w = 0 the output is the
    teacher's at the null class for every label, however the gate is trained; untrained, w >= 1 is the
    conditional model and w in (0, 1) lies between the two."""
    teacher = random_teacher()
    student = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, class_gate=True, film=True,
                                   class_ramp=1.0)
    rng = np.random.default_rng(3)
    z = ms.Tensor(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    t = ms.Tensor(rng.uniform(size=4).astype(np.float32))
    y = ms.Tensor(np.array([0, 3, 7, 9], np.int32))
    null = ms.Tensor(np.full(4, 10, np.int32))
    at = lambda net, labels, w: net(z, t, labels, ms.Tensor(np.full(4, w, np.float32))).asnumpy()
    np.testing.assert_array_equal(at(student, y, 0.0), at(teacher, null, 0.0))
    for w in (1.0, 3.0):
        np.testing.assert_allclose(at(student, y, w), at(teacher, y, w), atol=1e-5)
    half, cond, uncond = at(student, y, 0.5), at(teacher, y, 0.5), at(teacher, null, 0.5)
    assert 0 < np.abs(half - uncond).max() and 0 < np.abs(half - cond).max()
    # a trained gate (here: random) moves every w > 0 but not w = 0
    for p in student.guidance_gate.trainable_params():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    np.testing.assert_array_equal(at(student, y, 0.0), at(teacher, null, 0.0))
    assert np.abs(at(student, y, 3.0) - at(teacher, y, 3.0)).max() > 1e-3
    with pytest.raises(UserError, match="class_gate"):
        student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, class_gate=False, class_ramp=1.0)


def test_the_class_ramp_counts_only_with_the_class_gate(tiny_run, tmp_path) -> None:
    """The ramp scales the class gate: without the gate the default ramp is accepted, ignored and not recorded,
    and the distillation job trains a student without it; with the gate the student carries it."""
    from distill.core.checkpoint import read_meta
    from distill.core.provenance import stage_config
    from distill.jobs.preflight import check_config

    assert stage_config(compose_cfg(tmp_path), "student")["student.class_ramp"] == 0.5
    no_gate = compose_cfg(tmp_path, "student.class_gate=false")
    check_config(no_gate)
    assert "student.class_ramp" not in stage_config(no_gate, "student")
    assert stage_config(no_gate, "student") == stage_config(
        compose_cfg(tmp_path, "student.class_gate=false", "student.class_ramp=0"), "student")
    run = copy_run(tiny_run, tmp_path / "run", ("teacher",))
    run_distill(compose_cfg(run, "student.class_gate=false", "student.train.steps=1"))
    model = read_meta(run / "student" / "checkpoint.safetensors")["model"]
    assert "guidance_class_gate" not in model and "guidance_class_ramp" not in model
    assert read_meta(tiny_run / "student" / "checkpoint.safetensors")["model"]["guidance_class_ramp"] == 0.5


@pytest.mark.parametrize("target,expected", [("cfg", (1.5, 2.0, 0.5)), ("interval", (1.5, 2.0, 0.5)),
                                             ("cfgpp", (1.0, 0.0, 0.0))])
def test_w_power_w_loss_power_and_class_ramp_default_to_the_targets_row(tmp_path, target, expected) -> None:
    """student.by_target gives each target its defaults; a value on the command line wins, and a run records the
    values its keys resolved to, never the table (so a cfg run is recorded as before the table existed)."""
    from distill.core.provenance import stage_config

    keys = ("student.w_power", "student.w_loss_power", "student.class_ramp")
    values = stage_config(compose_cfg(tmp_path, f"student.target={target}"), "student")
    assert tuple(values[k] for k in keys) == expected
    assert not any(k.startswith("student.by_target") for k in values)
    given = stage_config(compose_cfg(tmp_path, f"student.target={target}", "student.w_loss_power=0.7"), "student")
    assert given["student.w_loss_power"] == 0.7 and given["student.w_power"] == expected[0]
    row = stage_config(compose_cfg(tmp_path, f"student.target={target}", f"student.by_target.{target}.w_power=2.5"),
                       "student")
    assert row["student.w_power"] == 2.5  # read from this target's own row, not from another's


def test_x_space_weight_matches_direct_x_space_loss() -> None:
    rng = np.random.default_rng(1)
    t = rng.uniform(0.05, 0.95, 5)
    alpha, sigma = dm.alpha_sigma(dm.logsnr_schedule("cosine", t))
    a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    z = rng.standard_normal((5, 1, 4, 4))
    out_student, out_teacher = rng.standard_normal((2, 5, 1, 4, 4))
    for prediction in ("v", "eps"):
        x_s, _ = dm.x0_eps_from_output(z, out_student, a, s, prediction)
        x_t, _ = dm.x0_eps_from_output(z, out_teacher, a, s, prediction)
        direct = ((x_s - x_t) ** 2).mean(axis=(1, 2, 3)) * np.maximum(alpha**2 / sigma**2, 1)
        weight = dm.output_space_weight("x_snr_trunc", prediction, alpha, sigma)
        np.testing.assert_allclose(weight * ((out_student - out_teacher) ** 2).mean(axis=(1, 2, 3)), direct, rtol=1e-5)


def test_distillation_brings_the_student_closer_to_the_cfg_target_on_unseen_inputs(tmp_path) -> None:
    untrained, trained = guidance_errors(tmp_path)
    assert trained < 0.93 * untrained, (trained, untrained)  # lr 0 would leave them equal


def test_ws_per_input_repeats_each_noisy_input_with_its_own_w_and_two_pass_targets() -> None:
    data = load_data({"name": "digits", "max_train": 64})
    teacher = random_teacher()
    z, t, y, w, y_neg, alpha, sigma = inputs = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=4)(3)
    assert z.shape[0] == 32 and len(np.unique(t)) == 8 and len(np.unique(w)) == 32
    np.testing.assert_array_equal(y_neg, np.full_like(y, 10))  # no negative classes asked: the null class
    for a in (z, t, y, alpha, sigma):  # 8 inputs, each in 4 adjacent rows
        np.testing.assert_array_equal(a, np.repeat(a[::4], 4, axis=0))
    # the teacher ran on 8 rows, yet every row's target is its own two-pass guided prediction
    null = np.full_like(y, 10)
    expected = GuidedPrediction(teacher)(*(ms.Tensor(a) for a in (z, t, y, w, null))).asnumpy()
    np.testing.assert_allclose(teacher_targets(GuidanceBranches(teacher), inputs, 4), expected, atol=1e-5)
    with pytest.raises(UserError, match="ws_per_input=3 must be an integer >= 1 that divides the batch size 32"):
        distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=3)


@pytest.mark.parametrize("ws_per_input", [1, 2])
def test_targets_from_shards_equal_online_targets(tiny_run, tmp_path, ws_per_input: int) -> None:
    k = f"student.ws_per_input={ws_per_input}"
    cfg = compose_cfg(tiny_run, f"student.targets_dir={tmp_path / 'targets'}", "student.targets=shards", k)
    run_targets(cfg)
    online = distill_batches(compose_cfg(tiny_run, k), load_data(cfg.data), load_teacher(cfg, load_data(cfg.data)))(0)
    from_shards = distill_batches(cfg, load_data(cfg.data), None)(0)
    for step in range(int(cfg.student.train.steps)):
        for a, b in zip(online(step), from_shards(step)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # a second run finds everything in place and writes nothing new
    manifest = (tmp_path / "targets" / "manifest.json").read_text()
    run_targets(cfg)
    assert (tmp_path / "targets" / "manifest.json").read_text() == manifest


def test_tampered_shard_is_refused(tiny_run, tmp_path) -> None:
    cfg = compose_cfg(tiny_run, f"student.targets_dir={tmp_path / 't'}", "student.targets=shards")
    run_targets(cfg)
    shard = sorted((tmp_path / "t").glob("shard_*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        shard_reader(cfg)(0)


def test_student_refuses_teacher_of_another_architecture(tiny_run, tmp_path) -> None:
    import shutil

    shutil.copytree(tiny_run / "teacher", tmp_path / "teacher")
    with pytest.raises(UserError, match="architecture"):
        run_distill(compose_cfg(tmp_path, "model.channels=16"))


def test_bad_w_range_is_refused(tiny_run) -> None:
    with pytest.raises(UserError, match="w range"):
        run_distill(compose_cfg(tiny_run, "student.w_min=3", "student.w_max=1"))


def test_distilled_student_loads_with_its_w_embedding(tiny_run) -> None:
    cfg = compose_cfg(tiny_run)
    student, meta = load_student(cfg, load_data(cfg.data))
    assert student.has_guidance and meta["w_convention"] == "uncond + w * (cond - uncond)"


def test_w_sampling_stays_in_range_and_power_moves_mass_to_low_w() -> None:
    rng = np.random.default_rng(0)
    uniform = sample_w(rng, 20000, 0.0, 5.0)
    assert uniform.min() >= 0 and uniform.max() <= 5 and abs(np.median(uniform) - 2.5) < 0.05
    low = sample_w(rng, 20000, 1.0, 5.0, power=2.0)  # u^2: median at 1 + 4 * 0.25
    assert low.min() >= 1 and low.max() <= 5 and abs(np.median(low) - 2.0) < 0.05
    assert abs(np.mean(low < 2.0) - 0.5) < 0.02 and abs(np.mean(uniform < 1.25) - 0.25) < 0.02


def test_bad_w_power_is_refused(tiny_run) -> None:
    with pytest.raises(UserError, match="w_power=0"):
        run_distill(compose_cfg(tiny_run, "student.w_power=0"))


def test_guidance_loss_weight_scales_each_example_by_its_w() -> None:
    w = np.array([0.0, 1.0, 4.0], np.float32)
    np.testing.assert_allclose(guidance_loss_weight(w, 2.0), [1.0, 0.25, 0.04], rtol=1e-6)
    np.testing.assert_array_equal(guidance_loss_weight(w, 0.0), [1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((3, 1, 8, 8)).astype(np.float32), np.full(3, 0.5, np.float32),
              np.zeros(3, np.int32), w, np.full(3, 10, np.int32), np.full(3, 0.8, np.float32),
              np.full(3, 0.6, np.float32))
    target = np.zeros((3, 1, 8, 8), np.float32)
    plain = regression_batch(inputs, target, "x_snr_trunc", "v")[-1]
    weighted = regression_batch(inputs, target, "x_snr_trunc", "v", w_loss_power=2.0)[-1]
    np.testing.assert_allclose(weighted, plain * np.array([1.0, 0.25, 0.04]), rtol=1e-6)


def test_bad_w_loss_power_is_refused(tiny_run) -> None:
    with pytest.raises(UserError, match="w_loss_power=-1"):
        run_distill(compose_cfg(tiny_run, "student.w_loss_power=-1"))


@pytest.mark.slow
def test_the_lr_schedule_reaches_the_distillation_step(tiny_run, tmp_path) -> None:
    # A warm-up starting at lr/1000 must move the student ~1000x less from the teacher in its first
    # steps. Run through the CLI: the schedule once stayed at the base lr in the real job (host-side
    # set_data on the optimizer's lr Parameter) while the same code worked in-process here.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY
    from distill.core.weights import net_state

    def start(name: str, *overrides: str) -> tuple[subprocess.Popen, Path, list[str]]:
        run = tmp_path / name
        shutil.copytree(tiny_run / "teacher", run / "teacher")
        args = [*TINY, f"run_dir={run}", "student.train.steps=2", "student.train.ema_decay=0", *overrides]
        cwd = tmp_path / f"{name}_cwd"  # each job its own working dir, so Hydra's outputs/ are not shared
        cwd.mkdir()
        with open(tmp_path / f"{name}.stderr", "w") as err:  # a file, not a pipe: neither job waits on a reader
            proc = subprocess.Popen([sys.executable, "-m", "distill", "task=distill", *args], cwd=cwd,
                                    stdout=subprocess.DEVNULL, stderr=err)
        return proc, run, args

    def moved(proc: subprocess.Popen, run: Path, args: list[str]) -> float:
        assert proc.wait(timeout=300) == 0, (run.parent / f"{run.name}.stderr").read_text()[-2000:]
        cfg = compose_cfg(run, *args[len(TINY):])  # ema_decay=0: the EMA weights load_student reads = the net
        data = load_data(cfg.data)
        before = net_state(load_teacher(cfg, data))
        after = net_state(load_student(cfg, data)[0])
        return max(float(np.abs(after[k] - v).max()) for k, v in before.items())

    # the two jobs run side by side (separate run dirs): on 2 cores that is one job's wall time, not two
    jobs = start("plain"), start("warm", "student.train.warmup_steps=1000")
    plain, warm = (moved(*job) for job in jobs)
    assert plain > 0 and plain / warm > 100


@pytest.mark.parametrize("flag", ["guidance_class_gate", "guidance_class_ramp", "guidance_film", "scale_shift_norm"])
def test_architecture_flags_round_trip_and_old_architecture_dicts_still_match(flag: str) -> None:
    """Checkpoints from before a flag existed do not store it; they must still compare equal."""
    plain = UNetConfig(guidance_embed_dim=16)
    assert flag not in plain.to_dict()  # byte-for-byte the dict older checkpoints hold
    assert UNetConfig.from_dict(plain.to_dict()) == plain
    value = 0.5 if flag == "guidance_class_ramp" else True  # the ramp is a number, the others switches
    flagged = UNetConfig(guidance_embed_dim=16, **{flag: value})
    assert flagged.to_dict()[flag] == value
    assert UNetConfig.from_dict(flagged.to_dict()) == flagged
    assert flagged.to_dict() != plain.to_dict()  # resume refuses a checkpoint of the other kind
