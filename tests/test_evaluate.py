"""Evaluation: report contents, same noise for both models, the real-vs-real floor."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_RUN, compose_cfg, copy_run
from distill.jobs.evaluate import real_floor, run_evaluate
from distill.core.metrics import mse


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    cfg = compose_cfg(tiny_run, *TINY_RUN, "eval.ws=[0.0,2.0]", "eval.num_samples=20")
    return run_evaluate(cfg), tiny_run / "evaluate"


def test_report_files_and_keys(evaluated) -> None:
    report, out = evaluated
    for name in ("report.json", "report.md", "metrics_vs_w.png", "speed.png", "samples_side_by_side.png",
                 "grid_w0.png", "grid_w2.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["ws"] == [0.0, 2.0]
    # by default: the two-pass teacher, the stage-one student and every progressive round, each at its own steps
    assert {m: (r["passes"], r["steps"]) for m, r in on_disk["models"].items()} == {
        "teacher": (2, 4), "student_4step": (1, 4), "student_2step": (1, 2)}
    for model in ("teacher", "student_4step", "student_2step"):
        assert on_disk["models"][model]["per_w"]["2.0"] == report["models"][model]["per_w"]["2.0"]
    assert "| w | teacher FD |" in (out / "report.md").read_text()
    # the negative-class comparison: every model that takes a negative class, null and negative draws per w
    neg = on_disk["negative"]
    assert neg["pairs"] == [[3, 8], [4, 9], [7, 1], [5, 6]] and list(neg["models"]) == list(on_disk["models"])
    for name, m in neg["models"].items():
        for w in ("0.0", "2.0"):
            assert set(m["per_w"][w]) >= {"null", "negative"}
            assert 0.0 <= m["per_w"][w]["negative"]["negative_probability"] <= 1.0
        if name != "teacher":
            r = m["per_w"]["2.0"]
            assert r["fd_ratio"] == pytest.approx(r["negative"]["fd"] / neg["models"]["teacher"]["per_w"]["2.0"]
                                                  ["negative"]["fd"])
    assert "## Negative classes" in (out / "report.md").read_text()
    assert "methods" not in on_disk and not (out / "methods_tradeoff.png").exists()  # eval.methods=[cfg]: no comparison


def test_a_model_against_itself(tiny_run, tmp_path) -> None:
    """An untrained student is the teacher's conditional model, i.e. the guided teacher at w = 1: the
    evaluation must find the same samples (PSNR far above any trained student's), the same FD and
    the same accuracy, and that accuracy is the classifier's on those images."""
    from distill.core.checkpoint import save_checkpoint
    from distill.core.classifier import features_and_predictions
    from distill.core.data import load_data
    from distill.core.weights import net_state
    from distill.jobs.common import evaluation_classifier
    from student.loading import student_meta
    from student.model import student_from_teacher
    from teacher.loading import load_teacher

    overrides = [f"teacher.checkpoint={tiny_run / 'teacher' / 'checkpoint.safetensors'}", "eval.ws=[1.0]",
                 "eval.num_samples=20"]
    cfg = compose_cfg(tmp_path, *overrides)
    data = load_data(cfg.data)
    s = cfg.student
    untrained = student_from_teacher(load_teacher(cfg, data), int(s.embed_dim), float(s.w_scale),
                                     bool(s.class_gate), bool(s.film))
    path = tmp_path / "untrained.safetensors"
    save_checkpoint(path, {f"ema.{k}": v for k, v in net_state(untrained).items()},
                    dict(student_meta(untrained.config, cfg, data), step=0, total_steps=0))
    report = run_evaluate(compose_cfg(tmp_path, *overrides, f"eval.student={path}"))
    t, st = (report["models"][m]["per_w"]["1.0"] for m in ("teacher", "student"))
    assert st["psnr"] > 60
    assert st["fd"] == pytest.approx(t["fd"], rel=1e-3, abs=1e-3)
    assert st["accuracy"] == t["accuracy"]
    saved = np.load(tmp_path / "evaluate" / "samples" / "student_4step_w1.npz")
    _, pred = features_and_predictions(evaluation_classifier(cfg, data), saved["images"].astype(np.float32)
                                       .transpose(0, 3, 1, 2) / 127.5 - 1)
    assert abs(float(np.mean(pred == saved["labels"])) - st["accuracy"]) <= 1 / 20  # uint8 rounding: one image at most


def test_samples_are_saved_and_agreement_is_recomputable(evaluated) -> None:
    report, out = evaluated
    models = (("teacher", 4), ("student", 4), ("student", 2))
    assert {p.name for p in (out / "samples").iterdir()} == {
        f"{m}_{n}step_w{w}.npz" for m, n in models for w in (0, 2)} | {
        f"{m}_{n}step_neg{k}_w{w}.npz" for m, n in models for w in (0, 2) for k in (8, 9, 1, 6)}
    neg = np.load(out / "samples" / "student_2step_neg9_w2.npz")  # the pair [4, 9]: 5 samples of class 4
    assert neg["images"].shape == (5, 8, 8, 1) and set(neg["labels"]) == {4} and int(neg["negative_class"]) == 9
    t = np.load(out / "samples" / "teacher_4step_w2.npz")
    s = np.load(out / "samples" / "student_4step_w2.npz")
    assert t["images"].shape == (20, 8, 8, 1) and t["images"].dtype == np.uint8
    np.testing.assert_array_equal(t["labels"], s["labels"])
    # the saved uint8 images give back the reported student-vs-teacher MSE (up to rounding)
    from_files = mse(s["images"].astype(np.float32) / 127.5 - 1, t["images"].astype(np.float32) / 127.5 - 1).mean()
    assert abs(from_files - report["agreement"]["2.0"]["mse"]) < 2e-3


def test_real_floor_is_small_for_same_distribution() -> None:
    from distill.core.metrics import frechet_distance

    x = np.random.default_rng(0).standard_normal((400, 4))
    floor = real_floor(x, 0)
    assert 0 <= floor < 0.2 and floor == real_floor(x, 0)
    assert frechet_distance(x[:200], x[200:] + 1.0) > 10 * floor  # a shift of 1 in 4 dims: about 4


@pytest.mark.slow
def test_guidance_methods_are_compared_on_the_teachers_noise(tiny_run, tmp_path) -> None:
    """eval.methods: CFG is the teacher's own evaluation, CFG++ at lambda 0 is the teacher at w = 0 (the same
    noise and classes), the interval method pays one pass outside the interval; one table, one plot."""
    run = copy_run(tiny_run, tmp_path / "run", ("teacher", "student"))
    report = run_evaluate(compose_cfg(run, *TINY_RUN, "eval.ws=[0.0,2.0]", "eval.num_samples=20",
                                      "eval.progressive=false", "eval.negative_classes=[]",
                                      "eval.methods=[cfg,cfgpp,interval]", "eval.cfgpp_lambdas=[0.0,0.6]",
                                      "eval.interval=[0.3,0.8]"))
    methods, teacher = report["methods"]["methods"], report["models"]["teacher"]["per_w"]
    assert list(methods) == ["cfg", "cfgpp", "interval"]
    assert methods["cfg"]["per_scale"] == {w: {"fd": t["fd"], "accuracy": t["accuracy"]} for w, t in teacher.items()}
    assert methods["cfgpp"]["per_scale"]["0.0"]["fd"] == pytest.approx(teacher["0.0"]["fd"], rel=1e-3)
    assert methods["cfgpp"]["per_scale"]["0.0"]["accuracy"] == teacher["0.0"]["accuracy"]
    # 4 steps at t = 1, 0.75, 0.5, 0.25: the interval guides two of them
    assert {m: r["network_calls_per_image"] for m, r in methods.items()} == {"cfg": 8, "cfgpp": 8, "interval": 6}
    assert methods["interval"]["interval"] == [0.3, 0.8] and methods["cfgpp"]["scale"] == "lambda"
    out = run / "evaluate"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"]
    assert (out / "methods_tradeoff.png").is_file()
    md = (out / "report.md").read_text()
    assert "## Guidance methods (teacher)" in md and "| CFG++ | lambda = 0.6 |" in md
