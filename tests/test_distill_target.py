"""student.target: the guidance-interval target (CFG inside [t_lo, t_hi], conditional outside) and the CFG++
target (two output heads: guided at lambda, unconditional), their shards, provenance, sampling and evaluation
settings; bad values refused in one line."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest

from conftest import (compose_cfg, distillation_run, gap_teacher, guidance_errors, random_teacher,
                      w_sensitive_student)
from distill.core import diffusion as dm
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.provenance import differences, stage_config
from distill.jobs.evaluate import common_target, model_settings
from student.distill import distill_inputs, distill_target, input_interval, teacher_targets
from teacher.guidance import ConditionalPrediction, GuidanceBranches, GuidedPrediction


def test_interval_target_is_guided_inside_and_conditional_outside() -> None:
    rng = np.random.default_rng(0)
    cond, uncond = rng.standard_normal((2, 6, 1, 2, 2)).astype(np.float32)
    w = np.array([0.0, 2.0, 3.0, 4.0, 0.5, 5.0], np.float32)
    t = np.array([0.05, 0.25, 0.5, 0.75, 0.7501, 0.95], np.float32)  # the bounds exact in float32
    out = dm.interval_guided(cond, uncond, w, t, (0.25, 0.75))
    inside = np.array([False, True, True, True, False, False])  # t_lo <= t <= t_hi, the sampler's rule
    guided = uncond + w.reshape(-1, 1, 1, 1) * (cond - uncond)
    np.testing.assert_allclose(out[inside], guided[inside], rtol=0, atol=0)
    np.testing.assert_array_equal(out[~inside], cond[~inside])  # exactly the conditional prediction
    assert (out[inside] != cond[inside]).any()  # the guided rows did move (w != 1)
    # the same rule as the sampler's guided steps
    np.testing.assert_array_equal(dm.in_interval(t, (0.25, 0.75)), inside)


def test_an_interval_covering_all_times_is_the_cfg_target() -> None:
    rng = np.random.default_rng(1)
    cond, uncond = rng.standard_normal((2, 5, 1, 2, 2)).astype(np.float32)
    w, t = rng.uniform(0, 5, 5).astype(np.float32), np.array([0.0, 0.3, 0.6, 0.99, 1.0], np.float32)
    np.testing.assert_array_equal(dm.interval_guided(cond, uncond, w, t, (0.0, 1.0)),
                                  dm.cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1)))
    np.testing.assert_array_equal(dm.interval_guided(cond, uncond, w, t, None),
                                  dm.cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1)))


def test_teacher_targets_with_an_interval_follow_the_two_pass_teacher() -> None:
    data = load_data({"name": "digits", "max_train": 64})
    teacher = random_teacher()
    branches = GuidanceBranches(teacher)
    z, t, y, w, y_neg, _, _ = inputs = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=2)(1)
    cfg_target = teacher_targets(branches, inputs, 2)
    np.testing.assert_array_equal(teacher_targets(branches, inputs, 2, (0.0, 1.0)), cfg_target)
    interval = (0.3, 0.7)
    target = teacher_targets(branches, inputs, 2, interval)
    inside = dm.in_interval(t, interval)
    assert inside.any() and (~inside).any()
    tensors = [ms.Tensor(a) for a in (z, t, y, w, y_neg)]
    guided = GuidedPrediction(teacher)(*tensors).asnumpy()
    conditional = ConditionalPrediction(teacher)(*tensors).asnumpy()  # one pass at y: the teacher at w = 1
    np.testing.assert_allclose(target[inside], guided[inside], atol=1e-5)
    np.testing.assert_allclose(target[~inside], conditional[~inside], atol=1e-5)
    assert np.abs(target[~inside] - cfg_target[~inside]).max() > 1e-3  # it is not the CFG target there


def test_the_interval_students_w_input_is_1_outside_the_interval_and_w_inside(tmp_path) -> None:
    data = load_data({"name": "digits", "max_train": 64})
    interval = (0.3, 0.7)
    plain = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=2)(1)
    z, t, y, w, y_neg, alpha, sigma = eff = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 5.0, ws_per_input=2,
                                                           w_interval=interval)(1)
    inside = dm.in_interval(t, interval)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(w[~inside], 1.0)  # exactly the conditional model's w
    np.testing.assert_array_equal(w[inside], plain[3][inside])  # the drawn w itself
    assert (plain[3][~inside] != 1.0).all()
    for a, b in zip(eff[:3] + eff[4:], plain[:3] + plain[4:]):  # the rest of the batch is unchanged
        np.testing.assert_array_equal(a, b)
    # the target is still the interval teacher's: CFG at the effective w, the conditional output itself outside
    branches = GuidanceBranches(random_teacher())
    np.testing.assert_array_equal(teacher_targets(branches, eff, 2, interval), teacher_targets(branches, plain, 2,
                                                                                              interval))
    # the config's default takes the effective w with target=interval; a checkpoint from before the option does not
    assert input_interval(compose_cfg(tmp_path, "student.target=interval").student) == (0.17, 0.88)
    assert input_interval(compose_cfg(tmp_path, "student.target=interval", "student.interval_input=false").student) \
        is None
    assert input_interval(compose_cfg(tmp_path).student) is None
    assert input_interval({"target": "interval", "interval": [0.2, 0.6]}) is None
    assert input_interval({"target": "interval", "interval": [0.2, 0.6], "interval_input": True}) == (0.2, 0.6)


@pytest.mark.slow
def test_distillation_brings_the_student_closer_to_the_interval_target_on_unseen_inputs(tmp_path) -> None:
    untrained, trained = guidance_errors(tmp_path, (0.17, 0.88))
    assert trained < 0.93 * untrained, (trained, untrained)


def test_target_from_config_and_meta(tmp_path) -> None:
    assert distill_target(compose_cfg(tmp_path).student) == ("cfg", None)
    assert distill_target({}) == ("cfg", None)  # a student checkpoint from before the option
    cfg = compose_cfg(tmp_path, "student.target=interval")
    assert distill_target(cfg.student) == ("interval", tuple(cfg.eval.interval))  # default: eval.interval
    cfg = compose_cfg(tmp_path, "student.target=interval", "eval.interval=[0.1,0.9]", "student.interval=[0.2,0.6]")
    assert distill_target(cfg.student) == ("interval", (0.2, 0.6))
    assert distill_target({"target": "interval", "interval": [0.2, 0.6]}) == ("interval", (0.2, 0.6))


@pytest.mark.parametrize("overrides,message", [
    (["student.target=cfgx"], r"^student: unknown target 'cfgx' \(choose cfg, interval, cfgpp\)$"),
    (["student.target=cfgpp", "student.lambda_range=[0.0,2.0]"],
     r"^student.lambda_range=\[0, 2\] must satisfy 0 <= lo <= hi <= 1 \(CFG\+\+ lambda lies in \[0, 1\]\)$"),
    (["student.target=cfgpp", "student.lambda_range=[0.8,0.2]"], r"^student.lambda_range=\[0.8, 0.2\] must satisfy"),
    (["student.target=cfgpp", "student.negative=true", "negative_phase.enabled=false"],
     r"^student.target=cfgpp takes no negative class: set student.negative=false$"),
    (["student.target=interval", "student.interval=[0.8,0.2]"],
     r"^student.interval: \[0.8, 0.2\] must be \[t_lo, t_hi\] with 0 <= t_lo < t_hi <= 1"),
    (["student.target=interval", "student.interval=[0.2,1.5]"], r"^student.interval: \[0.2, 1.5\] must be"),
    (["student.target=interval", "student.interval=null"], r"^student: target=interval needs student.interval"),
    (["student.target=interval", "progressive.first_teacher=cfg"],
     r"^progressive: first_teacher=cfg learns the two-pass CFG teacher, not the student's target=interval"),
])
def test_bad_targets_are_refused_before_any_work(tmp_path, overrides: list[str], message: str) -> None:
    from distill.jobs.preflight import check_config

    with pytest.raises(UserError, match=message):
        check_config(compose_cfg(tmp_path, "task=distill", *overrides))


def test_default_target_records_still_match_and_the_interval_counts_only_for_its_target(tmp_path) -> None:
    now = stage_config(compose_cfg(tmp_path), "student")
    assert now["student.target"] == "cfg" and "student.interval" not in now
    old = {"config": {k: v for k, v in now.items() if k != "student.target"}, "inputs": {}}  # made before the key
    assert differences(old, {"config": now, "inputs": {}}) == []
    moved = stage_config(compose_cfg(tmp_path, "eval.interval=[0.3,0.6]"), "student")
    assert differences(old, {"config": moved, "inputs": {}}) == []  # the cfg student does not read the interval
    interval = stage_config(compose_cfg(tmp_path, "student.target=interval"), "student")
    assert differences(old, {"config": interval, "inputs": {}}) == [
        "student.interval (absent) vs [0.17, 0.88]", "student.interval_input (absent) vs True",
        "student.target (absent) vs interval"]
    # an interval student recorded before interval_input took w at every t: it matches only interval_input=false
    before = {"config": {k: v for k, v in interval.items() if k != "student.interval_input"}, "inputs": {}}
    assert differences(before, {"config": interval, "inputs": {}}) == ["student.interval_input (absent) vs True"]
    w_at_every_t = stage_config(compose_cfg(tmp_path, "student.target=interval", "student.interval_input=false"),
                                "student")
    assert differences(before, {"config": w_at_every_t, "inputs": {}}) == []
    assert "student.interval_input" not in stage_config(compose_cfg(tmp_path), "student")
    other = stage_config(compose_cfg(tmp_path, "student.target=interval", "eval.interval=[0.3,0.6]"), "student")
    assert differences({"config": interval, "inputs": {}}, {"config": other, "inputs": {}}) == [
        "student.interval [0.17, 0.88] vs [0.3, 0.6]"]
    assert stage_config(compose_cfg(tmp_path, "student.target=interval"), "student_negative")["student.interval"] \
        == [0.17, 0.88]


def test_an_interval_student_is_evaluated_against_the_teacher_guided_in_its_interval(tmp_path) -> None:
    models = {"teacher": (None, 4), "student_4step": (None, 4), "student_2step": (None, 2)}
    cfg = compose_cfg(tmp_path, "task=evaluate")
    plain = model_settings(cfg, models, ("cfg", None))
    assert all(s.guidance_interval is None for s in plain.values())
    settings = model_settings(cfg, models, ("interval", (0.2, 0.8)))
    assert settings["teacher"].guidance_interval == (0.2, 0.8)
    assert settings["student_4step"].guidance_interval is None and settings["student_2step"].num_steps == 2
    same = model_settings(compose_cfg(tmp_path, "task=evaluate", "sampler.guidance_interval=[0.2,0.8]"), models,
                          ("interval", (0.2, 0.8)))
    assert same == settings
    # a CFG student under a sampler interval: both sampled with it, as before
    cfg_interval = model_settings(compose_cfg(tmp_path, "task=evaluate", "sampler.guidance_interval=[0.2,0.8]"),
                                  models, ("cfg", None))
    assert all(s.guidance_interval == (0.2, 0.8) for s in cfg_interval.values())
    with pytest.raises(UserError, match=r"sampler.guidance_interval=\[0.3, 0.8\] is not the interval the students "
                                        r"were distilled with \(\[0.2, 0.8\]\)"):
        model_settings(compose_cfg(tmp_path, "task=evaluate", "sampler.guidance_interval=[0.3,0.8]"), models,
                       ("interval", (0.2, 0.8)))
    assert common_target({"a": ("interval", (0.2, 0.8)), "b": ("interval", (0.2, 0.8))}) == ("interval", (0.2, 0.8))
    assert common_target({}) == ("cfg", None)
    with pytest.raises(UserError, match="^evaluate: the students were distilled to different targets"):
        common_target({"a": ("interval", (0.2, 0.8)), "b": ("cfg", None)})


def shard_and_online_batches(tiny_run, tmp_path, *target: str) -> tuple:
    """A copy of the tiny run's teacher with ``task=targets`` shards made for ``target`` (overrides); asserts
    every training step's batch read from the shards equals the one made online, and returns (run, the
    shards' cfg, data, the online batches)."""
    from conftest import copy_run
    from distill.jobs.distill import distill_batches
    from distill.jobs.targets import run_targets
    from teacher.loading import load_teacher

    run = copy_run(tiny_run, tmp_path / "run", ("teacher",))
    cfg = compose_cfg(run, *target, "student.targets=shards")
    run_targets(cfg)
    data = load_data(cfg.data)
    online = distill_batches(compose_cfg(run, *target), data, load_teacher(cfg, data))(0)
    from_shards = distill_batches(cfg, data, None)(0)
    batches = [online(step) for step in range(int(cfg.student.train.steps))]
    for step, a in enumerate(batches):
        for x, y in zip(a, from_shards(step)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    return run, cfg, data, batches


@pytest.mark.slow
def test_interval_targets_from_shards_equal_online_targets_and_the_student_records_them(tiny_run, tmp_path) -> None:
    from distill.core.checkpoint import read_meta
    from distill.jobs.distill import distill_batches, run_distill
    from teacher.loading import load_teacher

    target = ("student.target=interval", "student.interval=[0.3,0.7]")
    run, cfg, data, batches = shard_and_online_batches(tiny_run, tmp_path, *target)
    cfg_online = distill_batches(compose_cfg(run), data, load_teacher(cfg, data))(0)
    for step, a in enumerate(batches):
        c = cfg_online(step)
        inside = dm.in_interval(a[1], (0.3, 0.7))
        np.testing.assert_allclose(a[5][inside], c[5][inside], atol=1e-6)  # the CFG target inside
    # shards of the CFG target are not read for the interval target
    with pytest.raises(UserError, match="made for another teacher or config"):
        distill_batches(compose_cfg(run, "student.targets=shards", "student.target=interval",
                                    "student.interval=[0.2,0.7]"), data, None)
    run_distill(cfg)
    meta = read_meta(run / "student" / "checkpoint.safetensors")
    assert (meta["target"], meta["interval"], meta["interval_input"]) == ("interval", [0.3, 0.7], True)
    assert distill_target(meta) == ("interval", (0.3, 0.7)) and input_interval(meta) == (0.3, 0.7)
    # its evaluation: the teacher guided in the student's interval (4 steps at t = 1, .75, .5, .25: one guided),
    # the same samples as the interval method's; plain CFG drawn on its own for the methods table (this tiny teacher's
    # CFG and interval samples are too alike to tell apart by FD)
    from distill.jobs.evaluate import run_evaluate

    report = run_evaluate(compose_cfg(run, *target, "negative_phase.enabled=false", "eval.ws=[0.0,2.0]",
                                      "eval.num_samples=20",
                                      "eval.progressive=false", "eval.negative_classes=[]",
                                      "eval.methods=[cfg,interval]", "eval.interval=[0.3,0.7]"))
    assert report["student_target"] == {"target": "interval", "interval": [0.3, 0.7], "teacher_interval": [0.3, 0.7],
                                        "student_intervals": {"student_4step": [0.3, 0.7]}}
    models, methods = report["models"], report["methods"]["methods"]
    assert models["teacher"]["speed"]["network_evals_per_image"] == 5
    assert models["student_4step"]["speed"]["network_evals_per_image"] == 4
    for w in ("0.0", "2.0"):
        assert methods["interval"]["per_scale"][w]["fd"] == pytest.approx(models["teacher"]["per_w"][w]["fd"], rel=1e-4)
    assert (methods["cfg"]["network_calls_per_image"], methods["interval"]["network_calls_per_image"]) == (8, 5)
    assert "distilled with `student.target=interval`" in (run / "evaluate" / "report.md").read_text()
    assert "its w input w inside the interval and 1 outside" in (run / "evaluate" / "report.md").read_text()
    # the student's samples there are the sampler's with its interval (w = 1 outside), on the evaluation's noise
    from distill.core.build import sampler_settings
    from distill.core.images import load_samples_npz, to_uint8
    from distill.core.sampling import jit_predictor, sample_in_batches
    from distill.jobs.common import guided_samples
    from student.loading import load_student

    ecfg = compose_cfg(run, *target, "sampler.guidance_interval=[0.3,0.7]")
    student, _ = load_student(ecfg, data)
    imgs, _ = guided_samples(jit_predictor(ConditionalPrediction(student)), data, ecfg, 2.0, 20, int(ecfg.seed),
                             sampler_settings(ecfg, 4))
    saved = load_samples_npz(run / "evaluate" / "samples" / "student_4step_w2.npz")["images"]
    assert np.abs(saved.astype(int) - to_uint8(imgs).astype(int)).max() <= 1
    # a progressive round records its own interval (4 -> 2 steps at t = 1, 0.5: only 0.5 spans a guided step, 0.5)
    from distill.jobs.progressive import run_progressive
    from distill.jobs.publish import run_publish
    from student import from_pretrained

    run_progressive(cfg)
    round_meta = read_meta(run / "progressive" / "steps_2" / "checkpoint.safetensors")
    assert round_meta["w_interval"] == list(dm.round_interval((0.3, 0.7), 2)) == [0.25, 0.5]
    # the bundle samples each variant with its own interval, as the sampler called with it does
    run_publish(compose_cfg(run, *target, "negative_phase.enabled=false", "publish.overwrite=true"))
    config = from_pretrained(run / "bundle").config
    assert config["sampler"]["guidance_interval"] == [0.25, 0.5]
    assert config["variants"]["4step"]["guidance_interval"] == [0.3, 0.7]
    assert config["training"]["interval_input"] is True
    stage_one = from_pretrained(run / "bundle", "4step")
    labels = np.arange(4)
    noise = stage_one.noise(4, 0)
    by_hand = sample_in_batches(jit_predictor(ConditionalPrediction(student)), noise, labels.astype(np.int32), 2.0,
                                stage_one.settings(), np.full(4, 10, np.int32), 4)
    assert stage_one.settings().guidance_interval == (0.3, 0.7)
    np.testing.assert_allclose(stage_one.sample(labels, 2.0, noise=noise), by_hand, atol=1e-5)


def test_the_model_card_names_an_interval_target_and_only_that() -> None:
    from student.card import target_text

    assert target_text({}) == "" and target_text({"target": "cfg"}) == ""
    assert "guidance interval t in [0.17, 0.88] and its conditional output outside" in target_text(
        {"target": "interval", "interval": [0.17, 0.88]})
    assert "the interval is in the weights" in target_text({"target": "interval", "interval": [0.17, 0.88]})
    assert "passes w = 1 there" in target_text({"target": "interval", "interval": [0.17, 0.88], "interval_input": True})


def test_round_intervals_hold_exactly_the_steps_that_span_a_teacher_step_taking_w() -> None:
    assert dm.round_interval(None, 8) is None
    assert dm.round_interval((0.17, 0.88), 8) == (0.1875, 0.875)  # 16 -> 8: no step straddles an edge
    assert dm.round_interval((0.1875, 0.875), 4) is None  # 8 -> 4: t = 1 and 0.25 straddle: w at every step
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.choice([1, 2, 3, 4, 8]))
        lo, hi = np.sort(rng.uniform(0, 1, 2))
        fine = dm.sampling_times(2 * n)[:-1]
        want = dm.in_interval(fine[0::2], (lo, hi)) | dm.in_interval(fine[1::2], (lo, hi))
        if not want.any():
            with pytest.raises(UserError, match="holds no step"):
                dm.round_interval((lo, hi), n)
            continue
        got = dm.round_interval((lo, hi), n)
        steps = dm.in_interval(dm.sampling_times(n)[:-1], got)  # the sampler's rule on the round's own grid
        np.testing.assert_array_equal(steps, want)
        assert got is None or dm.check_interval(got) == got


def test_progressive_rounds_of_an_interval_student_give_w_by_each_ones_interval() -> None:
    from student.progressive import progressive_batches

    data = load_data({"name": "digits", "max_train": 64})
    net = ConditionalPrediction(random_teacher())
    calls = []

    def predict(z, t, y, w, y_neg):  # the round's teacher, recording the (t, w input) of every call
        calls.append((t.asnumpy(), w.asnumpy()))
        return net(z, t, y, w, y_neg)

    for intervals in (((0.17, 0.88), None), ((0.3, 0.7), (0.375, 0.75))):  # (the teacher's, the student's)
        plain = progressive_batches(data, predict, 4, 1, 32, 0, "cosine", "v", "x_snr_trunc", 0.0, 5.0, 1.0, True)(0)
        w_drawn = plain(1)[3]
        calls.clear()
        make = progressive_batches(data, predict, 4, 1, 32, 0, "cosine", "v", "x_snr_trunc", 0.0, 5.0, 1.0, True,
                                   w_intervals=intervals)(0)
        z, t, y, w, y_neg, target, weight = make(1)
        assert len(calls) == 2  # the teacher's two DDIM steps
        for t_call, w_call in calls:  # the teacher takes w only at its times inside its interval, 1 elsewhere
            np.testing.assert_array_equal(w_call, dm.interval_w(w_drawn, t_call, intervals[0]))
        assert any((w_call == 1.0).any() and (w_call != 1.0).any() for _, w_call in calls)
        np.testing.assert_array_equal(w, dm.interval_w(w_drawn, t, intervals[1]))  # the student: its own interval


def test_an_interval_student_is_sampled_with_its_interval_by_evaluate_and_the_bundle(tmp_path) -> None:
    import dataclasses

    from distill.core.sampling import SamplerSettings, initial_noise, sample
    from student.bundle import Pretrained, variant_config

    student = w_sensitive_student()
    cell = ConditionalPrediction(student)
    labels = np.arange(4, dtype=np.int32)
    noise = initial_noise(0, 4, (1, 8, 8))
    null = np.full(4, 10, np.int32)
    base = SamplerSettings(num_steps=4, engine="eager")  # steps at t = 1, 0.75, 0.5, 0.25

    def draw(w: float, interval):
        return sample(cell, noise, labels, w, dataclasses.replace(base, guidance_interval=interval), null)

    # one pass at w inside the interval, at w = 1 (the conditional model) outside
    np.testing.assert_array_equal(draw(3.0, (0.3, 0.4)), draw(1.0, None))  # holds no step: the w = 1 sampler
    np.testing.assert_array_equal(draw(3.0, (0.0, 1.0)), draw(3.0, None))  # holds every step: w at every step
    iv = (0.3, 0.8)  # holds t = 0.75 and 0.5
    with_iv = draw(3.0, iv)
    assert min(np.abs(with_iv - draw(3.0, None)).max(), np.abs(with_iv - draw(1.0, None)).max()) > 1e-3
    # evaluate: the student with its input interval, the teacher with the target's
    models = {"teacher": (None, 4), "student_4step": (None, 4), "student_2step": (None, 2)}
    settings = model_settings(compose_cfg(tmp_path, "task=evaluate"), models, ("interval", iv),
                              {"student_4step": iv, "student_2step": None})
    assert settings["teacher"].guidance_interval == iv and settings["student_4step"].guidance_interval == iv
    assert settings["student_2step"].guidance_interval is None  # a round that takes w at every step
    # the bundle: config.json's sampler.guidance_interval (each variant's own) is what sample applies
    config = {"sampler": {"kind": "ddim", "num_steps": 4, "eta": 0.0, "clip_x0": True, "dynamic_threshold": None,
                          "batch_size": 4, "guidance_interval": list(iv)},
              "diffusion": {"schedule": "cosine", "prediction": "v"}, "guidance": {"w_min": 0.0, "w_max": 5.0},
              "classes": {"names": [str(i) for i in range(10)], "null_class": 10},
              "image": {"channels": 1, "height": 8, "width": 8}, "model": student.config.to_dict(),
              "variants": {"4step": {"weights": "a", "num_steps": 4, "guidance_interval": list(iv)},
                           "2step": {"weights": "b", "num_steps": 2}}, "default_variant": "4step"}
    model = Pretrained(student, config)
    assert model.settings().guidance_interval == iv
    np.testing.assert_allclose(model.sample(labels, 3.0, noise=noise, engine="eager", use_jit=False), with_iv,
                               atol=1e-6)
    np.testing.assert_allclose(model.sample(labels, 3.0, noise=noise), with_iv, atol=1e-4)  # compiled step engine
    np.testing.assert_allclose(model.sample(labels, 3.0, noise=noise, engine="loop"), with_iv, atol=1e-4)
    assert variant_config(config, "2step", {"a", "b"})[1]["sampler"]["guidance_interval"] is None
    assert variant_config(config, None, {"a", "b"})[1]["sampler"]["guidance_interval"] == list(iv)
    before = dict(config, sampler={k: v for k, v in config["sampler"].items() if k != "guidance_interval"})
    assert Pretrained(student, before).settings().guidance_interval is None  # bundles from before: no interval


# ----------------------------------------------------------------------------- student.target=cfgpp
def test_cfgpp_heads_are_the_guided_and_the_unconditional_output() -> None:
    cond = np.array([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], np.float32)  # (B=2, C=1, 1, 2)
    uncond = np.array([[[[3.0, 0.0]]], [[[1.0, 1.0]]]], np.float32)
    out = dm.cfgpp_heads(cond, uncond, np.array([0.25, 1.0], np.float32))
    assert out.shape == (2, 2, 1, 2)
    # row 0: 3 + 0.25 (1 - 3) = 2.5, 0 + 0.25 (2 - 0) = 0.5; row 1 at lambda = 1: cond itself
    np.testing.assert_array_equal(out[:, :1], np.array([[[[2.5, 0.5]]], [[[0.0, -1.0]]]], np.float32))
    np.testing.assert_array_equal(out[:, 1:], uncond)
    np.testing.assert_array_equal(dm.cfgpp_heads(cond, uncond, 0.0)[:, :1], uncond)  # lambda 0: unconditional
    guided, unc = dm.split_heads(out)
    np.testing.assert_array_equal(guided, out[:, :1])
    np.testing.assert_array_equal(unc, uncond)


def _student_inputs(b: int = 4, seed: int = 0) -> tuple[ms.Tensor, ...]:
    rng = np.random.default_rng(seed)
    return (ms.Tensor(rng.standard_normal((b, 1, 8, 8)).astype(np.float32)),
            ms.Tensor(rng.uniform(0.1, 0.9, b).astype(np.float32)), ms.Tensor(np.arange(b, dtype=np.int32) % 10),
            ms.Tensor(rng.uniform(0, 1, b).astype(np.float32)), ms.Tensor(np.full(b, 10, np.int32)))


def test_the_untrained_cfgpp_student_returns_the_teachers_conditional_output_twice() -> None:
    from student.model import CFGppStudentPrediction, student_from_teacher, student_prediction

    teacher = random_teacher()
    student = student_from_teacher(teacher, 16, 1000.0, class_gate=True, film=True, uncond_head=True)
    assert student.config.guidance_uncond_head and student.config.to_dict()["guidance_uncond_head"] is True
    z, t, y, w, y_neg = _student_inputs()
    cond = teacher(z, t, y, w).asnumpy()
    out = student(z, t, y, w, y_neg).asnumpy()
    assert out.shape == (4, 2, 8, 8) and np.abs(cond).max() > 0.1
    np.testing.assert_array_equal(out[:, :1], out[:, 1:])  # the two heads bit for bit
    # the teacher's conditional output, to the rounding of a convolution with twice the output channels
    np.testing.assert_allclose(out[:, :1], cond, atol=1e-6, rtol=0)
    cell = student_prediction(student)
    assert isinstance(cell, CFGppStudentPrediction) and cell.passes == 1
    guided, uncond = cell.heads(z, t, y, w, y_neg)
    np.testing.assert_array_equal(guided.asnumpy(), out[:, :1])
    np.testing.assert_array_equal(uncond.asnumpy(), out[:, 1:])
    np.testing.assert_array_equal(cell(z, t, y, w, y_neg).asnumpy(), out[:, :1])  # a plain call: the guided head
    again = student(z, t, y, ms.Tensor(np.full(4, 0.9, np.float32)), y_neg).asnumpy()
    np.testing.assert_array_equal(again, out)  # untrained, w (lambda) changes nothing
    assert not isinstance(student_prediction(student_from_teacher(teacher, 16, 1000.0)), CFGppStudentPrediction)


def test_cfgpp_teacher_targets_are_the_guided_output_and_the_unconditional_branch() -> None:
    data = load_data({"name": "digits", "max_train": 64})
    teacher = random_teacher()
    branches = GuidanceBranches(teacher)
    z, t, y, w, y_neg, _, _ = inputs = distill_inputs(data, 32, 0, 0, "cosine", 0.0, 1.0, ws_per_input=2)(1)
    target = teacher_targets(branches, inputs, 2, None, "cfgpp")
    assert target.shape == (32, 2, 8, 8)
    np.testing.assert_array_equal(target[:, :1], teacher_targets(branches, inputs, 2))  # the CFG target at w
    _, uncond = branches(*(ms.Tensor(a) for a in (z, t, y, w, y_neg)))
    np.testing.assert_allclose(target[:, 1:], uncond.asnumpy(), atol=1e-5)
    assert np.abs(target[:, 1:] - target[:, :1]).max() > 1e-2  # the heads differ (w < 1), so the test can fail


@pytest.mark.slow
def test_distilling_the_cfgpp_target_moves_the_unconditional_head_to_the_teachers(tmp_path) -> None:
    """Trained alone (the last convolution, the trunk frozen: Adam's first steps on a student that starts at the
    teacher otherwise move the whole net more than 40 steps can learn), each head's error against its own target
    falls on inputs the training never saw: the unconditional head's from the teacher's cond - uncond gap."""
    from distill.core.data import load_data
    from teacher.guidance import GuidanceBranches as Branches

    losses, student, teacher = distillation_run(tmp_path, target="cfgpp", w_range=(0.0, 1.0), teacher=gap_teacher(),
                                                only=lambda name: name.startswith("conv_out"))
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])
    data = load_data({"name": "digits", "max_train": 64})
    z, t, y, w, y_neg, alpha, sigma = distill_inputs(data, 256, 1, 500, "cosine", 0.0, 1.0)(500)
    weight = dm.output_space_weight("x_snr_trunc", "v", alpha, sigma).reshape(-1)
    tensors = [ms.Tensor(a) for a in (z, t, y, w, y_neg)]
    cond, uncond = (o.asnumpy() for o in Branches(teacher)(*tensors))
    guided = dm.cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1))
    out = student(*tensors).asnumpy()

    def err(a: np.ndarray, b: np.ndarray) -> float:  # the training loss's per-example weighting
        return float(np.mean(((a - b) ** 2).mean(axis=(1, 2, 3)) * weight))

    before = err(cond, uncond)  # the untrained unconditional head is the conditional output
    assert err(out[:, 1:], uncond) < 0.8 * before, (err(out[:, 1:], uncond), before)
    assert err(out[:, :1], guided) < 0.9 * err(cond, guided)  # and the guided head moved to its target


@pytest.fixture(scope="module")
def cfgpp_student():
    """A CFG++ student whose heads differ (random guidance layers and a perturbed unconditional half of the last
    convolution), as a compiled predictor, and the plain CFG student."""
    from distill.core.sampling import jit_predictor
    from student.model import student_from_teacher, student_prediction

    teacher = random_teacher()
    nets = {}
    for heads in (True, False):
        net = student_from_teacher(teacher, 8, 1000.0, class_gate=True, film=True, uncond_head=heads)
        rng = np.random.default_rng(1)
        for name, p in net.parameters_and_names():
            if "guidance" in name or (heads and name.startswith("conv_out")):
                p.set_data(ms.Tensor((p.asnumpy() + 0.05 * rng.standard_normal(p.shape)).astype(np.float32)))
        net.set_train(False)
        nets[heads] = jit_predictor(student_prediction(net))
    return nets[True], nets[False]


def test_cfgpp_sampling_of_the_student_is_one_call_per_step_and_matches_the_hand_written_update(cfgpp_student) -> None:
    import dataclasses
    from distill.core.sampling import SamplerSettings, network_calls_per_image, sample, step_times

    student, _ = cfgpp_student
    rng = np.random.default_rng(5)
    noise, labels, unc = rng.standard_normal((3, 1, 8, 8)).astype(np.float32), np.arange(3, dtype=np.int32), \
        np.full(3, 10, np.int32)
    lam = 0.4
    settings = SamplerSettings(num_steps=3, clip_x0=False, guidance="cfgpp")
    z = noise.astype(np.float64)  # by hand (v prediction): x0 from the guided head, eps from the unconditional one
    for t, _, a_t, s_t, a_s, s_s in step_times(settings):
        args = (ms.Tensor(np.full(3, t, np.float32)), ms.Tensor(labels), ms.Tensor(np.full(3, lam, np.float32)),
                ms.Tensor(unc))
        guided, uncond = (o.asnumpy().astype(np.float64) for o in student.heads(ms.Tensor(z.astype(np.float32)), *args))
        x0 = a_t * z - s_t * guided
        z = a_s * x0 + s_s * (s_t * z + a_t * uncond)
    expected = np.clip(z, -1, 1)
    assert np.mean(np.abs(expected) < 1) > 0.3
    for engine in ("eager", "step", "loop"):
        got = sample(student, noise, labels, lam, dataclasses.replace(settings, engine=engine), unc)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the unconditional head matters: DDIM on the guided head alone (its own eps) gives other images
    net = student.cell.net
    plain = sample(lambda z_, t_, y_, w_, u_: dm.split_heads(net(z_, t_, y_, w_, u_))[0], noise, labels, lam,
                   dataclasses.replace(settings, guidance="cfg", engine="eager"), unc)
    assert np.abs(plain - expected).max() > 1e-3
    assert network_calls_per_image(settings, student.passes) == 3  # one pass per step


@pytest.mark.parametrize("name", ["ddim-v-clip", "ddpm-eps-threshold", "ddim-eta"])
def test_compiled_cfgpp_student_engines_equal_the_eager_reference(cfgpp_student, name: str) -> None:
    import dataclasses
    from distill.core.sampling import SamplerSettings, sample

    settings = {"ddim-v-clip": SamplerSettings(num_steps=3, guidance="cfgpp"),
                "ddpm-eps-threshold": SamplerSettings(num_steps=3, kind="ddpm", prediction="eps", guidance="cfgpp",
                                                      dynamic_threshold=0.9),
                "ddim-eta": SamplerSettings(num_steps=2, eta=0.5, guidance="cfgpp", w_schedule="linear")}[name]
    student, _ = cfgpp_student
    rng = np.random.default_rng(6)
    noise, labels, unc = rng.standard_normal((3, 1, 8, 8)).astype(np.float32), np.arange(3, dtype=np.int32), \
        np.full(3, 10, np.int32)
    eager = sample(student, noise, labels, 0.7, dataclasses.replace(settings, engine="eager"), unc, seed=2)
    for engine in ("step", "loop"):
        got = sample(student, noise, labels, 0.7, dataclasses.replace(settings, engine=engine), unc, seed=2)
        np.testing.assert_allclose(got, eager, atol=1e-5, rtol=0)


def test_a_cfgpp_student_samples_with_cfgpp_only_and_a_cfg_student_not_with_it(cfgpp_student) -> None:
    from distill.core.sampling import SamplerSettings, sample

    student, cfg_student = cfgpp_student
    noise, labels, unc = np.zeros((2, 1, 8, 8), np.float32), np.arange(2, dtype=np.int32), np.full(2, 10, np.int32)
    for engine in ("step", "eager"):
        with pytest.raises(UserError, match=r"^sampler: a CFG\+\+ student \(student.target=cfgpp\) samples with "
                                            r"guidance=cfgpp only \(its w input is CFG\+\+'s lambda\), not guidance=cfg$"):
            sample(student, noise, labels, 0.5, SamplerSettings(num_steps=2, engine=engine), unc)
        with pytest.raises(UserError, match=r"^sampler: guidance=cfgpp needs the two-pass teacher or a CFG\+\+ student"):
            sample(cfg_student, noise, labels, 0.5, SamplerSettings(num_steps=2, guidance="cfgpp", engine=engine), unc)
    with pytest.raises(UserError, match=r"^sampler: CFG\+\+ lambda 1.5 must be a number in \[0, 1\]$"):
        sample(student, noise, labels, 1.5, SamplerSettings(num_steps=2, guidance="cfgpp"), unc)
    with pytest.raises(UserError, match=r"^sampler: a CFG\+\+ student guides at every step; sample it with "
                                        r"guidance_interval=null$"):
        sample(student, noise, labels, 0.5, SamplerSettings(num_steps=2, guidance="cfgpp",
                                                            guidance_interval=(0.2, 0.8)), unc)


@pytest.mark.parametrize("task,message", [
    ("progressive", r"^student.target=cfgpp: task=progressive is not built for the CFG\+\+ student's two heads; "
                    r"run task=distill, then task=evaluate eval.progressive=false"),
    ("publish", r"^student.target=cfgpp: task=publish is not built for"),
    ("pipeline", r"^student.target=cfgpp: task=pipeline is not built for"),
    ("evaluate", r"^student.target=cfgpp has no progressive rounds \(not built for two heads\): set "
                 r"eval.progressive=false$"),
])
def test_tasks_without_cfgpp_students_refuse_the_target_before_any_work(tmp_path, task: str, message: str) -> None:
    from distill.jobs.preflight import check_config

    with pytest.raises(UserError, match=message):
        check_config(compose_cfg(tmp_path, f"task={task}", "student.target=cfgpp"))


def test_the_cfgpp_target_trains_lambda_in_its_range_and_its_evaluation_samples_with_cfgpp(tmp_path) -> None:
    from distill.jobs.evaluate import evaluation_scales
    from distill.jobs.preflight import check_config
    from student.distill import w_distribution

    cfg = compose_cfg(tmp_path, "task=evaluate", "student.target=cfgpp", "eval.progressive=false",
                      "sampler.guidance=cfgpp")
    check_config(cfg)  # CFG++ sampling is allowed for the evaluation of a CFG++ student
    assert distill_target(cfg.student) == ("cfgpp", None)
    assert w_distribution(cfg.student) == (0.0, 1.0, float(cfg.student.w_power))  # lambda_range, not [0, 5]
    assert w_distribution({"target": "cfgpp", "w_min": 0.2, "w_max": 0.9}) == (0.2, 0.9, 1.0)  # a checkpoint's meta
    with pytest.raises(UserError, match=r"^sampler.guidance=cfgpp cannot sample the one-pass student \(task=evaluate\)"):
        check_config(compose_cfg(tmp_path, "task=evaluate", "sampler.guidance=cfgpp"))  # a CFG student's evaluation
    models = {"teacher": (None, 4), "student_4step": (None, 4)}
    settings = model_settings(cfg, models, ("cfgpp", None))
    assert all(s.guidance == "cfgpp" and s.guidance_interval is None for s in settings.values())
    assert evaluation_scales(cfg, "cfgpp") == ("lambda", [float(x) for x in cfg.eval.cfgpp_lambdas])
    assert evaluation_scales(cfg, "cfg") == ("w", [float(x) for x in cfg.eval.ws])
    with pytest.raises(UserError, match=r"^evaluate: a CFG\+\+ student \(target=cfgpp\) guides every step"):
        model_settings(compose_cfg(tmp_path, "task=evaluate", "sampler.guidance_interval=[0.2,0.8]"), models,
                       ("cfgpp", None))


def test_the_lambda_range_counts_only_for_the_cfgpp_target(tmp_path) -> None:
    now = stage_config(compose_cfg(tmp_path), "student")
    assert "student.lambda_range" not in now
    assert stage_config(compose_cfg(tmp_path, "student.lambda_range=[0.0,0.5]"), "student") == now
    cfgpp = stage_config(compose_cfg(tmp_path, "student.target=cfgpp"), "student")
    narrow = stage_config(compose_cfg(tmp_path, "student.target=cfgpp", "student.lambda_range=[0.0,0.5]"), "student")
    assert differences({"config": cfgpp, "inputs": {}}, {"config": narrow, "inputs": {}}) == [
        "student.lambda_range [0.0, 1.0] vs [0.0, 0.5]"]
    assert "student.interval" not in cfgpp


def test_a_cfgpp_student_is_refused_where_one_output_is_read() -> None:
    from student.model import check_one_head, negative_phase_student, student_from_teacher

    student = student_from_teacher(random_teacher(), 8, 1000.0, class_gate=True, film=True, uncond_head=True)
    with pytest.raises(UserError, match=r"^task=bench takes a CFG student; this one was distilled with "
                                        r"student.target=cfgpp \(two output heads\)"):
        check_one_head(student, "task=bench")
    with pytest.raises(UserError, match=r"^the negative phase takes a CFG student"):
        negative_phase_student(student)


@pytest.mark.slow
def test_cfgpp_targets_from_shards_equal_online_and_the_student_is_evaluated_with_cfgpp(tiny_run, tmp_path,
                                                                                        caplog) -> None:
    from distill.core.checkpoint import read_meta
    from distill.jobs.distill import distill_batches, run_distill
    from distill.jobs.evaluate import run_evaluate

    target = ("student.target=cfgpp", "student.lambda_range=[0.0,0.8]")
    run, cfg, data, batches = shard_and_online_batches(tiny_run, tmp_path, *target)
    for a in batches:
        assert a[5].shape[1] == 2 and a[3].max() <= 0.8  # two heads; lambda in its range
    with pytest.raises(UserError, match="made for another teacher or config"):  # CFG shards are not CFG++ shards
        distill_batches(compose_cfg(run, "student.targets=shards"), data, None)
    with caplog.at_level("WARNING"):
        run_distill(cfg)
    assert "class_ramp" not in caplog.text  # target=cfgpp's own defaults (student.by_target.cfgpp): no ramp
    meta = read_meta(run / "student" / "checkpoint.safetensors")
    assert (meta["target"], meta["w_min"], meta["w_max"], meta["w_power"]) == ("cfgpp", 0.0, 0.8, 1.0)
    assert meta["model"]["guidance_uncond_head"] is True and "guidance_class_ramp" not in meta["model"]
    report = run_evaluate(compose_cfg(run, *target, "eval.cfgpp_lambdas=[0.0,0.6]", "eval.num_samples=20",
                                      "eval.progressive=false", "eval.negative_classes=[]"))
    assert report["student_target"]["target"] == "cfgpp" and report["scale"] == "lambda"
    assert report["ws"] == [0.0, 0.6]
    models = report["models"]
    assert models["teacher"]["speed"]["network_evals_per_image"] == 8
    assert models["student_4step"]["speed"]["network_evals_per_image"] == 4
    assert set(models["student_4step"]["per_w"]) == {"0.0", "0.6"}
    assert (run / "evaluate" / "samples" / "student_4step_lambda0.6.npz").is_file()
    with caplog.at_level("WARNING"):  # a ramp asked for on the command line is trained, with a warning
        run_distill(compose_cfg(run, *target, "student.class_ramp=0.5", "restart=true"))
    assert "student.class_ramp=0, the default of target=cfgpp, is the measured choice" in caplog.text
    assert read_meta(run / "student" / "checkpoint.safetensors")["model"]["guidance_class_ramp"] == 0.5
    assert "distilled with `student.target=cfgpp`" in (run / "evaluate" / "report.md").read_text()
