"""Negative classes in one pass: the student's input, its targets, sampling, bundle errors and the effect."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest

from conftest import TINY_RUN, compose_cfg, copy_run, random_teacher
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.weights import load_net_state, net_state
from distill.jobs import publish, sample as sample_job
from student import from_pretrained
from distill.core.weights import save_weights
from student.bundle import WEIGHTS, write_manifest
from student.distill import distill_inputs, sample_negative, teacher_targets
from student.model import student_from_teacher
from teacher.guidance import ConditionalPrediction, GuidanceBranches, GuidedPrediction

NULL = 10


def _inputs(n: int = 6, seed: int = 1) -> tuple[ms.Tensor, ...]:
    rng = np.random.default_rng(seed)
    return (ms.Tensor(rng.standard_normal((n, 1, 8, 8)).astype(np.float32)),
            ms.Tensor(rng.uniform(size=n).astype(np.float32)), ms.Tensor(rng.integers(0, 10, n).astype(np.int32)),
            ms.Tensor(np.linspace(0, 4, n).astype(np.float32)))


def test_null_negative_is_the_student_without_the_input_and_a_class_changes_it() -> None:
    teacher = random_teacher(attention=True)
    plain = student_from_teacher(teacher, 8, 1000.0, class_gate=True, film=True)
    negative = student_from_teacher(teacher, 8, 1000.0, class_gate=True, film=True, negative=True)
    z, t, y, w = _inputs()
    null, other = ms.Tensor(np.full(6, NULL, np.int32)), ms.Tensor(((y.asnumpy() + 3) % 10).astype(np.int32))
    # at init (gate zero) every negative class gives today's student, which is the teacher's conditional model
    for neg in (null, other):
        np.testing.assert_array_equal(negative(z, t, y, w, neg).asnumpy(), teacher(z, t, y, w).asnumpy())
    # trained-like weights: the same weights in both students; null negative still equals the plain student
    rng = np.random.default_rng(2)
    for p in plain.trainable_params():
        if "guidance_" in p.name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    load_net_state(negative, net_state(plain), "plain student")
    np.testing.assert_allclose(negative(z, t, y, w, null).asnumpy(), plain(z, t, y, w).asnumpy(), atol=1e-6)
    assert not np.allclose(negative(z, t, y, w, other).asnumpy(), plain(z, t, y, w).asnumpy(), atol=1e-3)
    # the one-pass cell hands the sampler's uncond labels to the student as its negative class
    np.testing.assert_array_equal(ConditionalPrediction(negative)(z, t, y, w, other).asnumpy(),
                                  negative(z, t, y, w, other).asnumpy())
    # a student without the input ignores it (so an old student cannot silently "use" a negative class)
    np.testing.assert_array_equal(plain(z, t, y, w, other).asnumpy(), plain(z, t, y, w).asnumpy())


def test_negative_draw_is_null_or_another_class() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 4000)
    neg = sample_negative(rng, y, 10, 0.5)
    assert not np.any(neg == y)
    assert 0.45 < np.mean(neg == NULL) < 0.55
    others = neg[neg != NULL]
    assert set(np.unique(others)) == set(range(10)) and np.ptp(np.bincount(others)) < 0.3 * len(others) / 10
    state = np.random.default_rng(5)
    assert np.all(sample_negative(state, y, 10, 1.0) == NULL)
    assert state.uniform() == np.random.default_rng(5).uniform()  # p = 1 draws nothing: batches stay as before


def test_targets_are_the_teacher_guided_away_from_each_rows_negative_class() -> None:
    data = load_data({"name": "digits", "max_train": 64})
    teacher = random_teacher(attention=True)
    inputs = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=2, p_null_negative=0.5)(1)
    z, t, y, w, y_neg, _, _ = inputs
    assert np.any(y_neg == NULL) and np.any(y_neg != NULL) and not np.any(y_neg == y)
    np.testing.assert_array_equal(y_neg, np.repeat(y_neg[::2], 2))  # one negative class per noisy input
    target = teacher_targets(GuidanceBranches(teacher), inputs, 2)
    expected = GuidedPrediction(teacher)(*(ms.Tensor(a) for a in (z, t, y, w, y_neg))).asnumpy()
    np.testing.assert_allclose(target, expected, atol=1e-5)
    # the formula on the same tensors: out(neg) + w (out(y) - out(neg))
    one = ms.Tensor(np.ones(len(y), np.float32))
    cond = teacher(ms.Tensor(z), ms.Tensor(t), ms.Tensor(y), one).asnumpy()
    away = teacher(ms.Tensor(z), ms.Tensor(t), ms.Tensor(y_neg), one).asnumpy()
    np.testing.assert_allclose(target, away + w.reshape(-1, 1, 1, 1) * (cond - away), atol=1e-5)


@pytest.fixture(scope="module")
def bundle(published_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a copy of the tiny run's bundle (the one task=publish makes of its students, which take a negative class)
    dest = Path(shutil.copytree(published_run / "bundle", tmp_path_factory.mktemp("negative_bundle") / "bundle"))
    # a few tiny training steps leave the output layer and the gate near zero: perturb the default student's
    # weights (and give the bundle a new manifest), so that the negative class shows in the images
    model = from_pretrained(dest)
    rng = np.random.default_rng(0)
    for p in model.net.trainable_params():
        scale = 1.0 if "guidance_gate" in p.name else 0.1
        p.set_data(ms.Tensor((p.asnumpy() + scale * rng.standard_normal(p.shape)).astype(np.float32)))
    save_weights(model.net, dest / WEIGHTS)
    write_manifest(dest)
    return dest


def test_bundle_samples_with_a_negative_class_in_one_pass(bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    model = from_pretrained(bundle)
    assert model.takes_negative and "Negative classes, in one pass" in (bundle / "README.md").read_text()
    labels = [3, 3, 4]
    null, away = model.sample(labels, 3.0), model.sample(labels, 3.0, negative=8)
    np.testing.assert_array_equal(null, model.sample(labels, 3.0, negative=None))
    assert not np.allclose(null, away)
    out = sample_job.run_sample(compose_cfg(tiny_run, f"sample.bundle={bundle}", f"sample.out={tmp_path}",
                                            "sample.classes=[3]", "sample.negative_class=8", "sample.w=3",
                                            "sample.per_class=3", "sample.steps=2"))
    saved = np.load(out)
    assert out.name == "student_w3_neg8_seed0_steps2.npz" and int(saved["negative_class"]) == 8
    as_saved = lambda x: np.rint((x + 1) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # noqa: E731
    np.testing.assert_array_equal(saved["images"], as_saved(model.sample([3, 3, 3], 3.0, num_steps=2, negative=8)))
    assert not np.array_equal(saved["images"], as_saved(model.sample([3, 3, 3], 3.0, num_steps=2)))


@pytest.mark.parametrize("negative,message", [(3, "equals a target class"), (10, "not a class index"),
                                              (-1, "not a class index")])
def test_bad_negative_classes_are_one_line_errors(bundle: Path, negative: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        from_pretrained(bundle).sample([3, 4], 2.0, negative=negative)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher with a stage-one student without the negative input (the default student). The teacher
    takes a few more, larger steps than the shared tiny run's, so that its classes differ enough for the
    negative path to get a gradient."""
    from distill.jobs.distill import run_distill
    from distill.jobs.teacher import run_teacher

    cfg = compose_cfg(tmp_path_factory.mktemp("plain_run"), "teacher.train.steps=20", "teacher.train.lr=1e-2")
    run_teacher(cfg)
    run_distill(cfg)
    return Path(str(cfg.run_dir))


def test_a_student_without_the_input_refuses_a_negative_class(plain_run: Path, tmp_path: Path) -> None:
    run = copy_run(plain_run, tmp_path / "run", ("teacher", "student"))
    dest = publish.run_publish(compose_cfg(run, "negative_phase.enabled=false", "publish.few_step=false",
                                          f"publish.dir={run / 'bundle'}"))  # a run without the phase
    assert not (dest / "negative_classes.png").exists()
    with pytest.raises(UserError, match="takes no negative class"):
        from_pretrained(dest).sample([3], 2.0, negative=8)


PHASE = ("negative_phase.enabled=true", "negative_phase.train.steps=2", "negative_phase.train.batch_size=16",
         "negative_phase.train.checkpoint_every=2")


@pytest.fixture(scope="module")
def phase_run(plain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plain_run`` plus two steps of the negative phase (the stage-one checkpoint's SHA-256 kept beside it)."""
    from distill.core.fileio import sha256
    from distill.jobs.negative_phase import run_negative_phase

    run = copy_run(plain_run, tmp_path_factory.mktemp("phase_run"), ("teacher", "student"))
    (run / "stage_one.sha256").write_text(sha256(run / "student" / "checkpoint.safetensors"))
    run_negative_phase(compose_cfg(run, *PHASE))
    return run


def test_the_negative_phase_trains_its_path_alone(phase_run: Path) -> None:
    """Two phase-two steps on a tiny run: the stage-one checkpoint is untouched, every stage-one weight is
    copied unchanged, with the null class the phase-two student samples the stage-one images bit for bit (one
    compiled pass each), and with another class the trained path changes the output (a little: the tiny
    teacher's classes barely differ; the slow test below measures the effect)."""
    from distill.core.build import sampler_settings
    from distill.core.fileio import sha256
    from distill.core.sampling import initial_noise, jit_predictor, sample_in_batches
    from student.loading import load_student, serving_student_path
    from student.model import is_negative_path, negative_phase_student

    cfg = compose_cfg(phase_run, *PHASE)
    assert sha256(phase_run / "student" / "checkpoint.safetensors") == (phase_run / "stage_one.sha256").read_text()
    data = load_data(cfg.data)
    stage_one, _ = load_student(cfg, data, phase_run / "student" / "checkpoint.safetensors")
    phase_two, meta = load_student(cfg, data, serving_student_path(cfg))
    assert phase_two.has_negative_path and meta["stage"] == "negative_phase" and meta["step"] == 2
    one, two = net_state(stage_one), net_state(phase_two)
    assert {k for k in two if k not in one} == {k for k in two if is_negative_path(k)}
    for name, value in one.items():
        np.testing.assert_array_equal(two[name], value, err_msg=name)
    noise, labels = initial_noise(0, 6, (1, 8, 8)), np.array([0, 1, 2, 3, 4, 5], np.int32)
    null = np.full(6, NULL, np.int32)
    draw = lambda net, w: sample_in_batches(  # noqa: E731
        jit_predictor(ConditionalPrediction(net), True), noise, labels, w, sampler_settings(cfg), null, 6, seed=0)
    for w in (0.0, 3.0):
        np.testing.assert_array_equal(draw(phase_two, w), draw(stage_one, w))
    z, t, y, w = _inputs()
    other = ms.Tensor(((y.asnumpy() + 4) % 10).astype(np.int32))
    untrained = negative_phase_student(stage_one)  # the path at zero: the stage-one student for every negative
    np.testing.assert_array_equal(untrained(z, t, y, w, other).asnumpy(), stage_one(z, t, y, w).asnumpy())
    assert np.abs(phase_two(z, t, y, w, other).asnumpy() - untrained(z, t, y, w, other).asnumpy()).max() > 0


def test_a_phase_two_bundle_takes_negative_classes_in_its_stage_one_variant(phase_run: Path, tmp_path: Path) -> None:
    """With progressive rounds (no negative input) as the default variant, the bundle's 4-step variant is the
    phase-two student with its own network config; task=sample picks it for a negative class."""
    from distill.jobs.progressive import run_progressive

    run = copy_run(phase_run, tmp_path / "run", ("teacher", "student", "student_negative"))
    run_progressive(compose_cfg(run, *PHASE))
    dest = publish.run_publish(compose_cfg(run, *PHASE, f"publish.dir={run / 'bundle'}"))
    default = from_pretrained(dest)
    assert not default.takes_negative and default.config["guidance"]["negative_variants"] == ["4step"]
    assert (dest / "negative_classes.png").is_file() and "`4step` variant takes them" in (dest / "README.md").read_text()
    with pytest.raises(UserError, match="variant='4step'"):
        default.sample([3], 2.0, negative=8)
    assert from_pretrained(dest, "4step").takes_negative
    out = sample_job.run_sample(compose_cfg(run, *PHASE, f"sample.bundle={dest}", f"sample.out={tmp_path}",
                                            "sample.classes=[3]", "sample.negative_class=8", "sample.per_class=2"))
    assert "_neg8_" in out.name and out.name.endswith("_steps4.npz")  # the 4-step variant: the phase-two student


@pytest.mark.slow
def test_guiding_away_lowers_the_negative_class_probability_on_a_trained_run(tmp_path: Path) -> None:
    """A small teacher and student, trained for a few hundred steps on the digits, then the negative phase: the
    evaluation classifier gives the negative class a lower mean probability when the samples are guided away
    from it than when they are guided with the null class, for the two-pass teacher and equally for the one-pass
    phase-two student."""
    from distill.jobs.distill import run_distill
    from distill.jobs.evaluate import run_evaluate
    from distill.jobs.negative_phase import run_negative_phase
    from distill.jobs.teacher import run_teacher

    cfg = compose_cfg(tmp_path / "run", "model.channels=16", "model.groups=8", "data.max_train=null",
                      "teacher.train.steps=300", "teacher.train.batch_size=64", "teacher.train.lr=3e-3",
                      "teacher.train.checkpoint_every=300", "teacher.check.num_samples=10",
                      "student.train.steps=150", "student.train.batch_size=64", "student.train.checkpoint_every=150",
                      "student.w_loss_power=0", "student.w_min=2", "student.w_max=4", "negative_phase.enabled=true",
                      "negative_phase.train.steps=100", "negative_phase.train.checkpoint_every=100",
                      "eval.classifier.steps=150", "eval.progressive=false", "eval.num_samples=20",
                      "eval.ws=[3.0]", "eval.negative_classes=[[3,8],[7,1]]", "eval.negative_samples=40",
                      "sampler.num_steps=8", "sampler.batch_size=80")
    run_teacher(cfg)
    run_distill(cfg)
    run_negative_phase(cfg)
    report = run_evaluate(cfg)
    models = report["negative"]["models"]
    assert set(models) == {"teacher", "student_8step"}
    # the same noise drawn both ways: a student that ignored its negative input would give a ratio of exactly 1
    for name, bound in (("teacher", 0.7), ("student_8step", 0.85)):
        m = models[name]["per_w"]["3.0"]
        away, null = m["negative"]["negative_probability"], m["null"]["negative_probability"]
        assert away < bound * null, (name, away, null)
    ratio = models["student_8step"]["per_w"]["3.0"]["negative_probability_ratio"]
    assert 0.5 < ratio < 2.0, ratio


def test_push_is_the_drop_in_the_negative_class_log_probability() -> None:
    """The push still tells guided-away samples from null-class ones where both probabilities round to zero."""
    from distill.jobs.negatives import guidance_push, negative_metrics

    feats = np.random.default_rng(0).standard_normal((4, 3))
    labels, negatives = np.array([0, 0, 1, 1]), np.array([2, 2, 2, 2])
    probs = lambda p: np.array([[1 - p, 0, p]] * 2 + [[0, 1 - p, p]] * 2)  # noqa: E731
    null, away = (negative_metrics(feats, probs(p), labels, negatives, feats) for p in (1e-4, 1e-7))
    assert null["accuracy"] == away["accuracy"] == 1.0 and away["negative_probability"] < 1e-3
    assert guidance_push({"null": null, "negative": away}) == pytest.approx(np.log(1e3))
    assert guidance_push({"null": null, "negative": null}) == 0.0


@pytest.mark.parametrize("pairs,message", [("[[3,3]]", "equals the target class"), ("[[3,12]]", "not a pair of class"),
                                           ("[[3]]", "each entry is")])
def test_bad_negative_pairs_fail_before_any_sampling(tiny_run: Path, tmp_path: Path, pairs: str, message: str) -> None:
    from distill.jobs.evaluate import run_evaluate

    run = copy_run(tiny_run, tmp_path / "run")
    with pytest.raises(UserError, match=message):
        run_evaluate(compose_cfg(run, *TINY_RUN, f"eval.negative_classes={pairs}", "eval.num_samples=10"))
    assert not (run / "evaluate").exists() and not (run / "eval_classifier").exists()


def test_the_verdict_names_the_bar_and_the_ws_a_student_misses() -> None:
    """Within only when both bars hold at every w <= 4 (w = 5 is not barred); otherwise each missed bar and its ws."""
    from distill.core.report import negative_lines
    from distill.jobs.negatives import bar_verdict

    ratios = {"0.5": (1.09, 0.90), "1.0": (1.10, 1.44), "3.0": (1.16, 0.71), "5.0": (1.50, 9.0)}
    per_w = {w: {"fd_ratio": fd, "negative_probability_ratio": p} for w, (fd, p) in ratios.items()}
    verdict = bar_verdict(per_w)
    assert verdict == {"within_bars": False,
                       "outside_bars": {"fd_ratio": [3.0], "negative_probability_ratio": [1.0, 3.0]}}
    assert bar_verdict({"0.5": per_w["0.5"], "5.0": per_w["5.0"]})["within_bars"]
    entry = lambda: {"negative": {"fd": 1.0, "accuracy": 1.0, "negative_probability": 0.1},  # noqa: E731
                     "null": {"accuracy": 1.0, "negative_probability": 0.2}, "push": 1.0}
    report = {"ws": [0.5], "models": {"teacher": {"steps": 4}, "student": {"steps": 4}},
              "negative": {"pairs": [[3, 8]], "samples_per_pair": 5,
                           "bars": {"fd_ratio": 1.15, "negative_probability_rel": 0.2, "max_w": 4.0},
                           "models": {"teacher": {"per_w": {"0.5": entry()}},
                                      "student": {"per_w": {"0.5": dict(entry(), fd_ratio=1.0,
                                                                        negative_probability_ratio=1.0)},
                                                  **verdict}}}}
    assert negative_lines(report)[-2].endswith("at every w <= 4): outside for FD ratio at w = 3; P(neg) at w = 1, 3")


def test_the_comparisons_null_class_samples_are_the_main_evaluations_from_the_same_noise(tmp_path: Path) -> None:
    """With DDIM the null-class half of the comparison is taken from the main evaluation's samples, which must be
    what drawing it from the pairs' noise gives; a stochastic sampler or too few samples per class draws it."""
    from distill.core import build
    from distill.core.sampling import jit_predictor
    from distill.jobs.common import guided_samples
    from distill.jobs.negatives import draw_negative_samples, negative_inputs, null_pool

    data = load_data({"name": "digits", "max_train": 64})
    cfg = compose_cfg(tmp_path, "eval.num_samples=40", "eval.negative_samples=3", "sampler.batch_size=16")
    settings = {"teacher": build.sampler_settings(cfg)}
    plan = ([(3, 8), (7, 1), (3, 5)], ["teacher"])
    predict = {"teacher": jit_predictor(GuidedPrediction(random_teacher(attention=True)))}
    pool = null_pool(cfg, plan, settings, "w", data.num_classes)
    assert pool == {}
    pool[("teacher", 2.0)], labels = guided_samples(predict["teacher"], data, cfg, 2.0, 40, int(cfg.seed),
                                                    settings["teacher"])
    inputs = negative_inputs(plan[0], 3, data.image_shape, int(cfg.seed), data.num_classes)
    np.testing.assert_array_equal(labels[inputs[3]], inputs[1])  # the rows are the pairs' target classes
    reused = draw_negative_samples(cfg, data, inputs, ["teacher"], predict, settings, 2.0, pool=pool)
    drawn = draw_negative_samples(cfg, data, inputs, ["teacher"], predict, settings, 2.0)
    np.testing.assert_allclose(reused[("teacher", "null")], drawn[("teacher", "null")], atol=1e-5)
    np.testing.assert_array_equal(reused[("teacher", "negative")], drawn[("teacher", "negative")])
    assert not np.allclose(drawn[("teacher", "null")], drawn[("teacher", "negative")], atol=1e-3)
    ddpm = {"teacher": build.sampler_settings(compose_cfg(tmp_path, "sampler.kind=ddpm"))}
    assert null_pool(cfg, plan, ddpm, "w", data.num_classes) is None
    few = compose_cfg(tmp_path, "eval.num_samples=20", "eval.negative_samples=3")  # 2 samples of each class
    assert null_pool(few, plan, settings, "w", data.num_classes) is None
    assert null_pool(compose_cfg(tmp_path, "eval.num_samples=40", "sampler.negative_class=2"), plan, settings, "w",
                     data.num_classes) is None
