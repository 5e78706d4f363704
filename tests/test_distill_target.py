"""student.target: the guidance-interval target (CFG inside [t_lo, t_hi], conditional outside), its shards,
provenance and evaluation settings; CFG++ and bad values refused in one line."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest

from conftest import compose_cfg, distillation_losses, random_teacher, w_sensitive_student
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
def test_distillation_to_the_interval_target_loss_falls(tmp_path) -> None:
    losses = distillation_losses(tmp_path, (0.17, 0.88))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_target_from_config_and_meta(tmp_path) -> None:
    assert distill_target(compose_cfg(tmp_path).student) == ("cfg", None)
    assert distill_target({}) == ("cfg", None)  # a student checkpoint from before the option
    cfg = compose_cfg(tmp_path, "student.target=interval")
    assert distill_target(cfg.student) == ("interval", tuple(cfg.eval.interval))  # default: eval.interval
    cfg = compose_cfg(tmp_path, "student.target=interval", "eval.interval=[0.1,0.9]", "student.interval=[0.2,0.6]")
    assert distill_target(cfg.student) == ("interval", (0.2, 0.6))
    assert distill_target({"target": "interval", "interval": [0.2, 0.6]}) == ("interval", (0.2, 0.6))


@pytest.mark.parametrize("overrides,message", [
    (["student.target=cfgx"], r"^student: unknown target 'cfgx' \(choose cfg or interval"),
    (["student.target=cfgpp"], r"^student.target=cfgpp is not supported yet: CFG\+\+ needs two outputs per step"),
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


@pytest.mark.slow
def test_interval_targets_from_shards_equal_online_targets_and_the_student_records_them(tiny_run, tmp_path) -> None:
    from conftest import copy_run
    from distill.core.checkpoint import read_meta
    from distill.jobs.distill import distill_batches, run_distill
    from distill.jobs.targets import run_targets
    from teacher.loading import load_teacher

    run = copy_run(tiny_run, tmp_path / "run", ("teacher",))
    target = ("student.target=interval", "student.interval=[0.3,0.7]")
    cfg = compose_cfg(run, *target, "student.targets=shards")
    run_targets(cfg)
    data = load_data(cfg.data)
    online = distill_batches(compose_cfg(run, *target), data, load_teacher(cfg, data))(0)
    cfg_online = distill_batches(compose_cfg(run), data, load_teacher(cfg, data))(0)
    from_shards = distill_batches(cfg, data, None)(0)
    for step in range(int(cfg.student.train.steps)):
        a, b, c = online(step), from_shards(step), cfg_online(step)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
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
