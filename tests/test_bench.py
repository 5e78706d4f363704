"""task=bench: the statistics against hand values, a tiny run's files, and bad configs.

No test asserts a timing threshold: speed claims come from `distill task=bench`, not tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg, tensorboard_scalars
from distill.jobs.bench import run_bench, speedup, spread, summarize
from distill.core.errors import UserError

TINY_BENCH = ["bench.batch_sizes=[2]", "bench.step_counts=[2]", "bench.repeats=2", "bench.warmup=1"]


def test_spread_hand_values() -> None:
    s = spread([4.0, 1.0, 3.0, 2.0, 10.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 10.0
    assert (s["q25"], s["q75"], s["iqr"]) == (2.0, 4.0, 2.0)  # linear-interpolated quartiles


def test_summarize_per_image_and_per_step() -> None:
    st = summarize([1.0, 2.0, 3.0, 4.0, 10.0], batch=2, steps=4)
    assert st["seconds_per_image"]["median"] == pytest.approx(1.5)
    assert st["seconds_per_image"]["iqr"] == pytest.approx(1.0)
    assert st["ms_per_step"]["median"] == pytest.approx(750.0)
    assert st["ms_per_step"]["iqr"] == pytest.approx(500.0)
    assert st["images_per_s"]["median"] == pytest.approx(2 / 3)
    assert st["images_per_s"]["max"] == pytest.approx(2.0) and st["images_per_s"]["min"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        summarize([], batch=2, steps=4)


def test_speedup_ratio_of_medians_and_paired() -> None:
    r = speedup([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert r["median_ratio"] == pytest.approx(2.0)  # median 4 / median 2
    assert r["paired"]["median"] == pytest.approx(2.0) and r["paired"]["max"] == pytest.approx(3.0)


def test_tiny_bench_writes_reports(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tensorboard_scalars(tiny_run / "tb")
    path = run_bench(compose_cfg(tiny_run, *TINY_BENCH))
    out = tiny_run / "bench"
    assert path == out / "bench.json"
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(path.read_text())
    assert {"platform", "cpu_count", "mindspore", "device"} <= set(report["machine"])
    (row,) = report["results"]
    assert (row["batch"], row["steps"]) == (2, 2)
    assert row["teacher"]["evals_per_step"] == 2 and row["student"]["evals_per_step"] == 1
    for model in ("teacher", "student"):
        assert len(row[model]["seconds"]) == 2
        for key in ("seconds_per_image", "images_per_s", "ms_per_step"):
            assert {"median", "min", "max", "iqr"} <= set(row[model][key])
    t_med, s_med = (float(np.median(row[m]["seconds"])) for m in ("teacher", "student"))
    assert row["speedup"]["median_ratio"] == pytest.approx(t_med / s_med)  # from the timings it reports
    assert row["student"]["ms_per_step"]["median"] == pytest.approx(1000 * s_med / 2)
    table = (out / "bench.md").read_text()
    assert "| batch | steps | teacher ms/step | student ms/step | teacher img/s | student img/s | speed-up |" in table
    assert table.splitlines()[-1] in capsys.readouterr().out
    # the run's TensorBoard log gains the bench's scalars, with the values of the report
    added = {tag: v for tag, v in tensorboard_scalars(tiny_run / "tb").items()
             if tag.startswith("bench/") and len(v) > len(before.get(tag, []))}
    assert added, "no bench scalars written to TensorBoard"
    speedups = [v[-1] for tag, v in added.items() if "speedup" in tag]
    assert speedups and speedups[-1][1] == pytest.approx(row["speedup"]["median_ratio"], rel=1e-6)


def test_other_student_and_fixed_teacher_steps(tiny_run: Path, tmp_path: Path) -> None:
    student = tiny_run / "student" / "checkpoint.safetensors"
    cfg = compose_cfg(tmp_path / "run", *TINY_BENCH, "bench.repeats=1", "bench.teacher_steps=3",
                      f"teacher.checkpoint={tiny_run / 'teacher' / 'checkpoint.safetensors'}",
                      f"bench.student={student}")
    report = json.loads(run_bench(cfg).read_text())
    (row,) = report["results"]
    assert (row["teacher"]["steps"], row["student"]["steps"]) == (3, 2)
    assert report["student_checkpoint"] == str(student)


@pytest.mark.parametrize("override", ["bench.batch_sizes=[]", "bench.step_counts=[0]", "bench.batch_sizes=[4,-1]",
                                      "bench.repeats=0", "bench.teacher_steps=0", "bench.step_counts=8"])
def test_bad_config_is_a_user_error(tmp_path: Path, override: str) -> None:
    with pytest.raises(UserError) as e:
        run_bench(compose_cfg(tmp_path, override))
    assert "bench:" in str(e.value) and "\n" not in str(e.value)
