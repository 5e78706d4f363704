"""The one-command pipeline on tiny budgets: every stage's output, then a re-run that skips."""
from __future__ import annotations

import json

import pytest

from conftest import compose_cfg
from distill.jobs.pipeline import is_fresh, run_pipeline


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path) -> None:
    cfg = compose_cfg(tmp_path, "eval.ws=[1.0,3.0]", "eval.num_samples=10", "bench.batch_sizes=[2]",
                      "bench.step_counts=[2]", "bench.repeats=1", "bench.warmup=2")
    first = run_pipeline(cfg)
    for path in ("teacher/checkpoint.safetensors", "student/checkpoint.safetensors", "evaluate/report.json",
                 "bench/bench.json", "bundle/manifest.json", "pipeline.json"):
        assert (tmp_path / path).is_file(), path
    assert all(isinstance(first[s], float) for s in ("teacher", "distill", "evaluate", "bench", "publish"))
    second = run_pipeline(cfg)
    assert second["evaluate"] == second["bench"] == second["publish"] == "skipped"
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
