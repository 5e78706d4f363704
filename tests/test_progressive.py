"""Progressive step distillation: the two-step DDIM target, rounds that halve the steps, resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest
from hydra.errors import ConfigCompositionException

from conftest import TINY_RUN, compose_cfg, copy_run
from distill.core import diffusion as dm
from distill.core.checkpoint import load_checkpoint, read_meta
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.sampling import SamplerSettings, jit_predictor, step_times
from student.loading import load_student
from student.model import student_from_teacher
from distill.jobs.progressive import run_progressive
from student.progressive import progressive_batches, round_plan, round_steps
from teacher.guidance import ConditionalPrediction
from teacher.unet import UNet, UNetConfig

SHAPE = (5, 1, 4, 4)


def _linear_net(prediction: str):
    """A fixed 'network' whose output is linear in z: out = c(t) * z + d(t) * b."""
    b = np.random.default_rng(3).standard_normal(SHAPE[1:])

    def out(z: np.ndarray, t: np.ndarray) -> np.ndarray:
        c, d = (0.5 + 0.3 * t).reshape(-1, 1, 1, 1), (1.0 - t).reshape(-1, 1, 1, 1)
        return c * z + d * b

    def denoise(z, t, alpha, sigma):
        return dm.x0_eps_from_output(z, out(z, t), alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1), prediction)

    return out, denoise


def _by_hand(out, z, t, a_t, s_t, a_m, s_m, a_s, s_s, prediction):
    """The teacher's two DDIM steps, written out with the closed-form conversions."""
    col = lambda v: np.asarray(v, np.float64).reshape(-1, 1, 1, 1)  # noqa: E731

    def x0_eps(z, o, a, s):
        if prediction == "v":
            return a * z - s * o, s * z + a * o
        return (z - s * o) / a, o

    x0, eps = x0_eps(z, out(z, t[0]), col(a_t), col(s_t))
    z_mid = col(a_m) * x0 + col(s_m) * eps
    x0, eps = x0_eps(z_mid, out(z_mid, t[1]), col(a_m), col(s_m))
    return col(a_s) * x0 + col(s_s) * eps


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_one_step_with_the_target_lands_on_the_teachers_two_steps(prediction: str) -> None:
    out, denoise = _linear_net(prediction)
    n = 4
    i = np.array([4, 3, 2, 1, 1])  # t = 1 (pure noise) ... t = 1/N, whose s = 0 is clean data
    z = np.random.default_rng(0).standard_normal(SHAPE)
    times = dm.progressive_times(n, i)
    (a_t, s_t), (a_m, s_m), (a_s, s_s) = (dm.grid_alpha_sigma("cosine", x) for x in times)
    z_s = _by_hand(out, z, times, a_t, s_t, a_m, s_m, a_s, s_s, prediction)
    target, x_tilde, z_s_fn = dm.two_step_ddim_target(denoise, z, times, "cosine", prediction)
    np.testing.assert_allclose(z_s_fn, z_s, atol=1e-10)
    # ONE DDIM step from z_t with the target output reproduces the teacher's z_s
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x0, eps = dm.x0_eps_from_output(z, target, col(a_t), col(s_t), prediction)
    one_step = dm.ddim_step(x0, eps, col(a_t), col(s_t), col(a_s), col(s_s))
    np.testing.assert_allclose(one_step, z_s, atol=1e-5)
    np.testing.assert_allclose(x0, x_tilde, atol=1e-5)
    # at s = 0 the target x is the teacher's landing point itself
    assert a_s[-1] == 1.0 and s_s[-1] == 0.0
    np.testing.assert_allclose(x_tilde[-2:], z_s[-2:], atol=1e-12)


def test_training_times_are_the_samplers_grid() -> None:
    for n in (1, 3, 4, 16):
        coarse = step_times(SamplerSettings(num_steps=n))
        fine = step_times(SamplerSettings(num_steps=2 * n))
        for i in range(1, n + 1):
            t, t_mid, s = dm.progressive_times(n, i)
            (a_t, s_t), (a_m, s_m), (a_s, s_s) = (dm.grid_alpha_sigma("cosine", x) for x in (t, t_mid, s))
            assert (float(t), float(s), float(a_t), float(s_t), float(a_s), float(s_s)) == coarse[n - i]
            assert (float(t), float(t_mid), float(a_t), float(s_t), float(a_m), float(s_m)) == fine[2 * (n - i)]
            assert (float(t_mid), float(s), float(a_m), float(s_m), float(a_s), float(s_s)) == fine[2 * (n - i) + 1]
    with pytest.raises(UserError):
        dm.progressive_times(4, 0)


def test_round_plan() -> None:
    assert round_plan(16, 4) == [8, 4]
    assert round_plan(4, 2) == [2] and round_plan(8, 1) == [4, 2, 1]
    for bad in ((12, 4), (4, 4), (3, 1), (8, 0)):
        with pytest.raises(UserError):
            round_plan(*bad)


def _random_student(seed: int = 0) -> UNet:
    teacher = UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=False, image_size=8,
                              num_classes=10))
    student = student_from_teacher(teacher, embed_dim=8, w_scale=1000.0)
    rng = np.random.default_rng(seed)
    for p in student.trainable_params():  # non-zero output layers, w matters
        p.set_data(ms.Tensor((p.asnumpy() + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    return student


@pytest.mark.slow
def test_progressive_loss_falls(tmp_path: Path) -> None:
    from distill.core.training import Trainer, TrainSettings
    from distill.core.weights import copy_weights
    from teacher.objective import regression_loss

    data = load_data({"name": "digits", "max_train": 64})
    teacher = _random_student()
    student, ema = UNet(teacher.config), UNet(teacher.config)
    copy_weights(teacher, student)
    predict = jit_predictor(ConditionalPrediction(teacher))

    def batches(batch_size: int, seed: int):
        return progressive_batches(data, predict, 4, 1, batch_size, seed, "cosine", "v", "x_snr_trunc", 0.0, 5.0, 1.0, False)

    held = batches(128, 1)(0)(0)  # a fixed batch the student never trains on
    assert [a.shape for a in held] == [(128, 1, 8, 8), (128,), (128,), (128,), (128,), (128, 1, 8, 8), (128,)]
    assert set(np.round(held[1] * 4, 5)) == {1.0, 2.0, 3.0, 4.0}  # t on the student's 4-step grid

    def held_loss() -> float:
        return float(regression_loss(student, *(ms.Tensor(a) for a in held)).asnumpy())

    before = held_loss()  # > 0: one teacher step is not two
    settings = TrainSettings(steps=30, batch_size=32, lr=3e-4, ema_decay=0.9, checkpoint_every=30, log_every=10)
    Trainer(student, ema, regression_loss, batches(32, 0), settings, tmp_path, {"kind": "student"}).run()
    assert 0 < held_loss() < 0.7 * before, (before, held_loss())


TRAIN = ["progressive.train.batch_size=16", "progressive.train.checkpoint_every=2", "progressive.train.log_every=2"]




def _progressive(run: Path, *overrides: str) -> Path:
    return run_progressive(compose_cfg(run, "progressive.start_steps=4", "progressive.min_steps=2",
                                       "progressive.train.steps=4", *TRAIN, *overrides))


@pytest.fixture(scope="module")
def progressive_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(tiny_run, tmp_path_factory.mktemp("progressive"), ("teacher", "student"))
    _progressive(run)
    return run


@pytest.mark.slow
def test_one_round_halves_the_steps(progressive_run: Path) -> None:
    path = progressive_run / "progressive" / "steps_2" / "checkpoint.safetensors"
    meta = read_meta(path)
    assert meta["kind"] == "student" and meta["sampling_steps"] == 2 and meta["round"] == 1
    assert meta["teacher_steps"] == 4 and meta["step"] == meta["total_steps"] == 4
    stage_one = read_meta(progressive_run / "student" / "checkpoint.safetensors")
    assert (meta["w_min"], meta["w_max"], meta["model"]) == (stage_one["w_min"], stage_one["w_max"], stage_one["model"])
    cfg = compose_cfg(progressive_run)
    net, _ = load_student(cfg, load_data(cfg.data), path)  # loads like any student
    assert net.config.guidance_embed_dim > 0
    rounds = json.loads((progressive_run / "progressive" / "rounds.json").read_text())
    assert [(r["round"], r["steps"], r["status"]) for r in rounds["rounds"]] == [(1, 2, "trained")]


@pytest.mark.slow
def test_resume_skips_finished_rounds_and_continues_a_partial_one(progressive_run: Path, tmp_path: Path) -> None:
    run = copy_run(progressive_run, tmp_path / "more")
    done = run / "progressive" / "steps_2" / "checkpoint.safetensors"
    before = done.read_bytes()
    last = _progressive(run, "progressive.min_steps=1")
    assert done.read_bytes() == before  # round 1 skipped, untouched
    assert last == run / "progressive" / "steps_1" / "checkpoint.safetensors"
    meta = read_meta(last)
    assert meta["sampling_steps"] == 1 and meta["round"] == 2 and meta["teacher_checkpoint"] == str(done)
    rounds = json.loads((run / "progressive" / "rounds.json").read_text())["rounds"]
    assert [(r["steps"], r["status"]) for r in rounds] == [(2, "skipped"), (1, "trained")]
    # an interrupted round (2 of 4 steps) resumes where it stopped and replays the same batches
    run = copy_run(progressive_run, tmp_path / "partial", ("teacher", "student"))
    _progressive(run, "progressive.train.steps=2")
    assert read_meta(run / "progressive" / "steps_2" / "checkpoint.safetensors")["step"] == 2
    _progressive(run)
    resumed, meta = load_checkpoint(run / "progressive" / "steps_2" / "checkpoint.safetensors")
    full, _ = load_checkpoint(done)
    assert meta["step"] == 4
    np.testing.assert_allclose(resumed["losses"], full["losses"], rtol=1e-5)


@pytest.mark.slow
def test_evaluate_teacher_against_several_students(progressive_run: Path, tmp_path: Path) -> None:
    from distill.jobs.evaluate import run_evaluate

    run = copy_run(progressive_run, tmp_path / "eval")
    p2 = run / "progressive" / "steps_2" / "checkpoint.safetensors"
    cfg = compose_cfg(run, *TINY_RUN, "eval.ws=[2.0]", "eval.num_samples=20", "eval.teacher_steps=4",
                      f"eval.students=[{{name:s4,path:null,steps:4}},{{name:p2,path:'{p2}'}}]")
    report = run_evaluate(cfg)
    assert {n: (m["passes"], m["steps"]) for n, m in report["models"].items()} == {
        "teacher": (2, 4), "s4": (1, 4), "p2": (1, 2)}
    assert report["models"]["p2"]["speed"]["network_evals_per_image"] == 2
    assert report["speedup"] == report["models"]["s4"]["speed"]["speedup"] > 0
    text = (run / "evaluate" / "report.md").read_text()
    assert "| w | teacher FD |" in text and "| s4 (4) |" in text and "| p2 (2) |" in text
    assert np.load(run / "evaluate" / "samples" / "p2_2step_w2.npz")["steps"] == 2


def test_eval_students_spec(tiny_run: Path, tmp_path: Path) -> None:
    from distill.jobs.evaluate import student_specs

    data = load_data(compose_cfg(tiny_run).data)
    rounds = tiny_run / "progressive"
    # default: the run's stage-one student at the sampler's steps, then every progressive round
    assert student_specs(compose_cfg(tiny_run), data) == [
        ("student_4step", None, 4), ("student_2step", rounds / "steps_2" / "checkpoint.safetensors", 2)]
    assert student_specs(compose_cfg(tiny_run, "eval.progressive=false"), data) == [("student_4step", None, 4)]
    one = tiny_run / "student" / "checkpoint.safetensors"
    assert student_specs(compose_cfg(tmp_path, f"eval.student={one}"), data) == [("student", one, 4)]
    specs = student_specs(compose_cfg(tmp_path, f"eval.students=[{{name:s,steps:8}},{{name:p,path:'{one}'}}]"), data)
    assert specs == [("s", None, 8), ("p", one, None)]
    for bad, message in (("eval.students=[{name:teacher}]", "unique name"), ("eval.students=[{name:a},{name:a}]", "unique"),
                         ("eval.students=[{name:a,steps:0}]", "must be >= 1"),
                         ("eval.students=[{name:'../x'}]", "used in file names"),
                         ("eval.students=[{name:a,path:/absent.safetensors}]", "checkpoint not found: /absent"),
                         ("eval.student=/a.safetensors", "checkpoint not found: /a.safetensors"),
                         (f"eval.student={one}", "not both")):
        extra = ("eval.students=[{name:a}]",) if message == "not both" else ()
        with pytest.raises(UserError, match=message):
            student_specs(compose_cfg(tmp_path, bad, *extra), data)
    for bad in ("eval.students=[a]", "eval.students=[{name:a,step:4}]"):  # not an entry: the schema refuses it
        with pytest.raises(ConfigCompositionException, match="eval.students"):
            compose_cfg(tmp_path, bad)
    shutil.copytree(tiny_run / "student", tmp_path / "student")  # a run without its progressive rounds
    with pytest.raises(UserError, match="progressive round of 2 steps not found.*eval.progressive=false"):
        student_specs(compose_cfg(tmp_path), data)


def test_rounds_of_another_stage_one_student_are_refused(tiny_run: Path, tmp_path: Path) -> None:
    """A run whose stage-one student was retrained keeps rounds made from the old one: every consumer refuses them."""
    from distill.jobs.distill import run_distill
    from distill.jobs.evaluate import run_evaluate
    from distill.jobs.publish import run_publish

    copy_run(tiny_run, tmp_path, ("teacher", "progressive"))
    run_distill(compose_cfg(tmp_path, "seed=1", *TINY_RUN))  # another stage-one student of the same kind
    round_file = tmp_path / "progressive" / "steps_2" / "checkpoint.safetensors"
    before = round_file.read_bytes()
    with pytest.raises(UserError, match=r"was made with other inputs: inputs.stage_one \w+ vs \w+; inputs.teacher"):
        run_progressive(compose_cfg(tmp_path))  # restart=true (or the pipeline) would train the rounds again
    for job in (run_evaluate, run_publish):
        with pytest.raises(UserError, match="was distilled from another stage-one student"):
            job(compose_cfg(tmp_path, *TINY_RUN, "eval.num_samples=4"))
    assert round_file.read_bytes() == before and not (tmp_path / "bundle").exists()


def test_round_loss_is_weighted_by_w_like_stage_one() -> None:
    """Each example's weight is the loss-space weight times (1 + w)^-w_loss_power; the rest of the batch
    does not depend on the power (same draws)."""
    data = load_data({"name": "digits", "max_train": 64})
    predict = jit_predictor(ConditionalPrediction(_random_student()))

    def batch(power: float) -> tuple[np.ndarray, ...]:
        return progressive_batches(data, predict, 4, 1, 16, 0, "cosine", "v", "x_snr_trunc", 0.0, 5.0, 1.5, False,
                                   power)(0)(0)

    plain, weighted = batch(0.0), batch(2.0)
    for a, b in zip(plain[:6], weighted[:6]):
        np.testing.assert_array_equal(a, b)
    w = plain[3]
    np.testing.assert_allclose(weighted[6], plain[6] * (1.0 + w) ** -2.0, rtol=1e-6)
    assert w.min() < 1.0 < w.max()  # the weights really differ across the batch


def test_first_round_can_learn_from_the_two_pass_teacher(tiny_run: Path, tmp_path: Path) -> None:
    copy_run(tiny_run, tmp_path, ("teacher", "student"))
    with pytest.raises(UserError, match="first_teacher 'x' must be student or cfg"):
        run_progressive(compose_cfg(tmp_path, "progressive.first_teacher=x"))
    assert not (tmp_path / "progressive").exists()
    run_progressive(compose_cfg(tmp_path, "progressive.first_teacher=cfg"))
    meta = read_meta(tmp_path / "progressive" / "steps_2" / "checkpoint.safetensors")
    assert meta["first_teacher"] == "cfg" and meta["round_w_loss_power"] == 2.0
    # a different teacher gives different weights than the stage-one-student teacher of tiny_run
    a = load_checkpoint(tmp_path / "progressive" / "steps_2" / "checkpoint.safetensors")[0]
    b = load_checkpoint(tiny_run / "progressive" / "steps_2" / "checkpoint.safetensors")[0]
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("net."))


def test_round_steps_per_round() -> None:
    """round_steps gives each round its own budget in round order; rounds past its end (or all, when
    null) train progressive.train.steps; entries must be integers >= 1."""
    assert round_steps({"round_steps": None}, [8, 4], 500) == [500, 500]
    assert round_steps({"round_steps": [300, 700]}, [8, 4], 500) == [300, 700]
    assert round_steps({"round_steps": [300, 700]}, [8, 4, 2], 500) == [300, 700, 500]
    assert round_steps({"round_steps": [300, 700]}, [4], 20) == [300]
    for bad in ([300, 0], [300, 1.5], [True]):
        with pytest.raises(UserError, match="round_steps .* must be training steps per round"):
            round_steps({"round_steps": bad}, [8, 4], 500)


def test_w0_share_puts_that_share_of_examples_at_w_min() -> None:
    """w0_share > 0 sets about that share of the examples' w to exactly w_min and leaves the other
    examples' draws alone; 0 gives the batches of before the option (no extra draw)."""
    data = load_data({"name": "digits", "max_train": 256})
    predict = jit_predictor(ConditionalPrediction(_random_student()))

    def batch(share: float) -> tuple[np.ndarray, ...]:
        return progressive_batches(data, predict, 4, 1, 128, 0, "cosine", "v", "x_snr_trunc", 0.0, 5.0, 1.5, False,
                                   2.0, 1.0, share)(0)(0)

    plain, shared = batch(0.0), batch(0.25)
    for k in (0, 1, 2, 4):  # z_t, t, y, y_neg: the same draws
        np.testing.assert_array_equal(plain[k], shared[k])
    at_zero = shared[3] == 0.0
    assert 0.1 < at_zero.mean() < 0.4 and not (plain[3] == 0.0).any()
    np.testing.assert_array_equal(shared[3][~at_zero], plain[3][~at_zero])
    np.testing.assert_array_equal(batch(0.0)[3], plain[3])
    with pytest.raises(UserError, match="w0_share 1.5 must be a number in \\[0, 1\\]"):
        batch(1.5)


@pytest.mark.slow
def test_round_steps_train_each_round_its_own_budget(progressive_run: Path, tmp_path: Path) -> None:
    run = copy_run(progressive_run, tmp_path / "budgets", ("teacher", "student"))
    _progressive(run, "progressive.min_steps=1", "progressive.round_steps=[3]")
    assert read_meta(run / "progressive" / "steps_2" / "checkpoint.safetensors")["step"] == 3
    assert read_meta(run / "progressive" / "steps_1" / "checkpoint.safetensors")["step"] == 4  # train.steps
