"""Guidance response: effective w and relative error, on arrays and on real models."""
from __future__ import annotations

import json

import numpy as np
import mindspore as ms
import pytest

from conftest import compose_cfg, random_teacher, w_sensitive_student
from distill.core.errors import UserError
from distill.core import diffusion as dm
from student.model import student_from_teacher
from distill.jobs.response import run_response
from student.response import effective_w, guidance_response, relative_error
from teacher.guidance import ConditionalPrediction, GuidanceBranches
from teacher.unet import UNet, UNetConfig


def test_effective_w_recovers_w_and_ignores_orthogonal_error() -> None:
    rng = np.random.default_rng(0)
    u, c = rng.standard_normal((2, 50, 1, 4, 4))
    d = (c - u).ravel()
    noise = rng.standard_normal(d.shape)
    noise -= d * (noise @ d) / (d @ d)  # orthogonal to c - u
    s = u + 2.5 * (c - u) + 0.3 * noise.reshape(u.shape)
    assert effective_w(s, c, u) == pytest.approx(2.5, abs=1e-9)
    expected = 0.3 * np.linalg.norm(noise) / np.linalg.norm(d)
    assert relative_error(s, c, u, 2.5) == pytest.approx(expected, rel=1e-9)
    assert effective_w(u + 0.5 * (c - u), c, u) == pytest.approx(0.5) and relative_error(u, c, u, 0.0) == 0.0


def test_untrained_student_responds_as_the_conditional_model_at_every_w() -> None:
    """Zero-initialised guidance layers: effective w 1 whatever w is asked, no error at w = 1, and at
    w = 3 a miss of exactly 2 |cond - uncond|."""
    teacher = UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4, image_size=8, num_classes=10))
    rng = np.random.default_rng(1)
    for p in teacher.trainable_params():  # non-trivial weights (output layers start at zero)
        p.set_data(ms.Tensor((p.asnumpy() + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    student = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, class_gate=True, film=True)
    x = rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    rows = guidance_response(GuidanceBranches(teacher), ConditionalPrediction(student), x, y, 10,
                             dm.sampling_times(3)[:-1], [0.0, 1.0, 3.0], "cosine", "v", seed=0)
    assert [r["t"] for r in rows] == pytest.approx([1.0, 2 / 3, 1 / 3])
    for r in rows:
        assert all(v == pytest.approx(1.0, abs=1e-4) for v in r["effective_w"].values())
        assert r["relative_error"][1.0] < 1e-4 and r["relative_error"][3.0] == pytest.approx(2.0, abs=1e-3)


def test_an_interval_students_response_takes_w_inside_and_1_outside_its_interval() -> None:
    """The untrained student is the conditional model at any w input, so the interval target's error is 0 at
    t outside the interval (target: the conditional output) and w - 1 times |cond - uncond| inside; a student
    with perturbed guidance layers answers the same at every w outside the interval (its input is 1 there)."""
    teacher = random_teacher()
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    times, iv = dm.sampling_times(4)[:-1], (0.3, 0.8)  # guides t = 0.75 and 0.5 of 1, 0.75, 0.5, 0.25
    untrained = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0)
    rows = guidance_response(GuidanceBranches(teacher), ConditionalPrediction(untrained), x, y, 10, times,
                             [0.0, 3.0], "cosine", "v", 0, iv, iv)
    for r in rows:
        inside = bool(dm.in_interval(r["t"], iv))
        assert r["relative_error"][3.0] == pytest.approx(2.0 if inside else 0.0, abs=1e-3)
    rows = guidance_response(GuidanceBranches(teacher), ConditionalPrediction(w_sensitive_student()), x, y, 10,
                             times, [0.0, 3.0], "cosine", "v", 0, iv, iv)
    for r in rows:
        same = r["effective_w"][0.0] == r["effective_w"][3.0]
        assert same != bool(dm.in_interval(r["t"], iv))


def test_response_job_writes_a_report(tiny_run) -> None:
    report = run_response(compose_cfg(tiny_run, "response.ws=[0.5,2.0]", "response.num_images=16"))
    on_disk = json.loads((tiny_run / "response" / "response.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["num_images"] == 16 and len(report["rows"]) == 4  # sampler.num_steps=4 in the tiny config
    assert all(np.isfinite(r["effective_w"]["2.0"]) for r in report["rows"])
    assert "## Effective w" in (tiny_run / "response" / "response.md").read_text()


@pytest.mark.parametrize("override,message", [("response.num_images=0", "num_images=0"),
                                              ("response.ws=[]", "at least one w"),
                                              ("response.ws=[-1]", "w=-1.0 must be")])
def test_bad_response_settings_are_refused(tmp_path, override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        run_response(compose_cfg(tmp_path, override))
