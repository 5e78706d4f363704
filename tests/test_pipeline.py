"""The one-command pipeline on tiny budgets: every stage's output, then a re-run that skips."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose_cfg
from distill.jobs.pipeline import is_fresh, run_pipeline
from student import from_pretrained


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path) -> None:
    cfg = compose_cfg(tmp_path, "eval.ws=[1.0,3.0]", "eval.num_samples=10", "bench.batch_sizes=[2]",
                      "bench.step_counts=[2]", "bench.repeats=1", "bench.warmup=2")
    first = run_pipeline(cfg)
    for path in ("teacher/checkpoint.safetensors", "student/checkpoint.safetensors",
                 "progressive/steps_2/checkpoint.safetensors", "evaluate/report.json", "evaluate/grid_w3.png",
                 "bench/bench.json", "bundle/manifest.json", "pipeline.json"):
        assert (tmp_path / path).is_file(), path
    assert all(isinstance(first[s], float) for s in ("teacher", "distill", "progressive", "evaluate", "bench", "publish"))
    # the evaluation holds the teacher, the stage-one student and the few-step round, with named sample files
    samples = {p.name for p in (tmp_path / "evaluate" / "samples").iterdir()}
    assert {"teacher_4step_w3.npz", "student_4step_w3.npz", "student_2step_w3.npz"} <= samples
    # the bundle samples with the few-step round by default, and with the stage-one student on request
    few, stage_one = from_pretrained(tmp_path / "bundle"), from_pretrained(tmp_path / "bundle", variant="4step")
    assert few.settings().num_steps == 2 and stage_one.settings().num_steps == 4
    a, b = few.sample([1, 2], w=2.0, seed=0), stage_one.sample([1, 2], w=2.0, seed=0)
    assert a.shape == b.shape == (2, 1, 8, 8) and not np.array_equal(a, b)
    round_file = tmp_path / "progressive/steps_2/checkpoint.safetensors"
    stamp = round_file.stat().st_mtime_ns
    second = run_pipeline(cfg)
    assert second["evaluate"] == second["bench"] == second["publish"] == "skipped"
    assert round_file.stat().st_mtime_ns == stamp  # a finished round is skipped, not retrained
    assert json.loads((tmp_path / "pipeline.json").read_text())["evaluate"] == "skipped"


def test_is_fresh_compares_modification_times(tmp_path) -> None:
    import os

    src, out = tmp_path / "ckpt", tmp_path / "report"
    src.write_text("a")
    assert not is_fresh([out], [src])
    out.write_text("b")
    os.utime(src, (1000, 1000))
    assert is_fresh([out], [src])
    os.utime(out, (500, 500))
    assert not is_fresh([out], [src])
