"""The one-command pipeline on tiny budgets: every stage's output (the negative phase included, as by default), a
re-run that skips, then re-runs after a changed teacher and a changed evaluation grid that make exactly the stages
downstream of the change again."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose_cfg
from distill.jobs import sample as sample_job
from distill.core import provenance
from distill.core.checkpoint import read_meta
from distill.jobs.pipeline import run_pipeline
from student import from_pretrained


# the bench stage times only the compiled samplers, with a small peak matmul: what it measures is test_bench's; here
# it must run, be skipped and be made again like every other stage
OVERRIDES = ("eval.ws=[1.0,3.0]", "eval.num_samples=10", "bench.batch_sizes=[2]", "bench.step_counts=[2]",
             "bench.repeats=1", "bench.warmup=2", "bench.single_thread_max_batch=null", "bench.eager_models=[]",
             "bench.peak_matmul_size=64")


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_exactly_what_a_change_makes_stale(tmp_path) -> None:
    cfg = compose_cfg(tmp_path, *OVERRIDES)
    assert cfg.negative_phase.enabled  # the default: negative classes in one pass
    first = run_pipeline(cfg)
    for path in ("teacher/checkpoint.safetensors", "student/checkpoint.safetensors",
                 "student_negative/checkpoint.safetensors", "progressive/steps_2/checkpoint.safetensors",
                 "evaluate/report.json", "evaluate/grid_w3.png", "bench/bench.json", "bundle/manifest.json",
                 "bundle/negative_classes.png", "pipeline.json"):
        assert (tmp_path / path).is_file(), path
    assert all(isinstance(first[s], float)
               for s in ("teacher", "distill", "negative_phase", "progressive", "evaluate", "bench", "publish"))
    # the evaluation holds the teacher, the stage-one student (here the phase-two one) and the few-step round, with
    # named sample files; the teacher and the phase-two student are compared guided away from negative classes
    samples = {p.name for p in (tmp_path / "evaluate" / "samples").iterdir()}
    assert {"teacher_4step_w3.npz", "student_4step_w3.npz", "student_2step_w3.npz", "teacher_4step_neg8_w3.npz",
            "student_4step_neg8_w3.npz"} <= samples and "student_2step_neg8_w3.npz" not in samples
    report = json.loads((tmp_path / "evaluate/report.json").read_text())
    assert list(report["negative"]["models"]) == ["teacher", "student_4step"]
    assert report["provenance"]["inputs"]["student_4step"] == provenance.file_digest(
        tmp_path / "student_negative/checkpoint.safetensors")
    # the command on the default run: one-pass samples of class 3 guided away from class 8, from the
    # bundle's stage-one variant (the phase-two student), which the card says takes negative classes
    assert "Negative classes, in one pass" in (tmp_path / "bundle/README.md").read_text()
    drawn = sample_job.run_sample(compose_cfg(tmp_path, *OVERRIDES, "sample.classes=[3]", "sample.negative_class=8",
                                              "sample.w=3", "sample.per_class=2"))
    assert drawn.name == "student_w3_neg8_seed0_steps4.npz" and set(np.load(drawn)["labels"]) == {3}
    # the bundle samples with the few-step round by default, and with the stage-one student on request
    few, stage_one = from_pretrained(tmp_path / "bundle"), from_pretrained(tmp_path / "bundle", variant="4step")
    assert few.settings().num_steps == 2 and stage_one.settings().num_steps == 4
    a, b = few.sample([1, 2], w=2.0, seed=0), stage_one.sample([1, 2], w=2.0, seed=0)
    assert a.shape == b.shape == (2, 1, 8, 8) and not np.array_equal(a, b)
    checkpoints = {stage: tmp_path / stage / "checkpoint.safetensors"
                   for stage in ("teacher", "student", "student_negative")}
    checkpoints["round"] = tmp_path / "progressive/steps_2/checkpoint.safetensors"
    stamps = {k: p.stat().st_mtime_ns for k, p in checkpoints.items()}
    second = run_pipeline(cfg)
    assert second["evaluate"] == second["bench"] == second["publish"] == "skipped"
    assert {k: p.stat().st_mtime_ns for k, p in checkpoints.items()} == stamps  # finished stages are not retrained
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert record["evaluate"] == "skipped"
    # the stages made by the first run keep that run's times; nothing was made again
    assert {k: v["seconds"] for k, v in record["last_made"].items()} == {
        s: t for s, t in first.items() if s != "total_seconds"}

    # a longer teacher (constant lr: the same run, continued) makes every stage downstream of it again
    third = run_pipeline(compose_cfg(tmp_path, *OVERRIDES, "teacher.train.steps=6"))
    assert all(isinstance(third[s], float) for s in ("evaluate", "bench", "publish"))
    assert json.loads((tmp_path / "pipeline.json").read_text())["last_made"]["teacher"]["seconds"] == third["teacher"]
    assert read_meta(checkpoints["teacher"])["step"] == 6
    teacher_digest = provenance.file_digest(checkpoints["teacher"])
    assert read_meta(checkpoints["student"])["provenance"]["inputs"]["teacher"] == teacher_digest
    phase = read_meta(checkpoints["student_negative"])["provenance"]["inputs"]  # the phase follows both
    assert phase["teacher"] == teacher_digest and phase["student"] == provenance.file_digest(checkpoints["student"])
    assert checkpoints["round"].stat().st_mtime_ns != stamps["round"]
    assert json.loads((tmp_path / "bundle/config.json").read_text())["provenance"]["inputs"]["teacher"] == teacher_digest

    # another evaluation grid: the evaluation (and the bundle, whose card shows it) again, nothing else
    stamps = {k: p.stat().st_mtime_ns for k, p in checkpoints.items()}
    fourth = run_pipeline(compose_cfg(tmp_path, *OVERRIDES, "teacher.train.steps=6", "eval.ws=[1.0]"))
    assert isinstance(fourth["evaluate"], float) and isinstance(fourth["publish"], float)
    assert fourth["bench"] == "skipped"
    assert json.loads((tmp_path / "evaluate/report.json").read_text())["ws"] == [1.0]
    assert {k: p.stat().st_mtime_ns for k, p in checkpoints.items()} == stamps
