"""task=bench: the statistics against hand values, a tiny run's files, and bad configs.

No test asserts a timing threshold: speed claims come from `distill task=bench`, not tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg, copy_run, tensorboard_scalars
from distill.core.speed import busy_warning, cpu_clock, flop_rate, other_cores, speedup, spread, summarize
from distill.jobs.bench import run_bench
from teacher.flops import forward_flops
from distill.core.errors import UserError

TINY_BENCH = ["bench.batch_sizes=[2]", "bench.step_counts=[2]", "bench.repeats=2",
              "bench.warmup=1", "bench.peak_matmul_size=64", "bench.eager_models=[teacher,student]",
              "bench.single_thread_max_batch=null"]


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


def test_flop_rate_hand_values() -> None:
    r = flop_rate(1e9, 2, 3, 2.0, {"numpy_matmul": 6.0, "mindspore_matmul": 1.5})
    assert r["gflops"] == pytest.approx(3.0)  # 1 GFLOP x 2 evals x 3 images / 2 s
    assert r["pct_of_numpy_matmul"] == pytest.approx(50.0) and r["pct_of_mindspore_matmul"] == pytest.approx(200.0)


def test_forward_flops_counts_each_layer_once() -> None:
    from mindspore import nn, ops

    class Toy(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, pad_mode="pad", padding=1, has_bias=True)
            self.down = nn.Conv2d(4, 4, 3, stride=2, pad_mode="pad", padding=1, has_bias=True, group=2)
            self.fc = nn.Dense(3, 5)

        def construct(self, x, t, y, w):
            self.fc(ops.ones((2, 3), x.dtype))
            return self.down(self.conv(x))

    f = forward_flops(Toy(), (1, 8, 8), 10)
    assert f["conv"] == 2 * (4 * 8 * 8 * 1 * 9) + 2 * (4 * 4 * 4 * 2 * 9)  # out elements x in/group x k^2
    assert f["dense"] == 2 * (2 * 5 * 3) and f["attention"] == 0
    assert f["total"] == f["conv"] + f["dense"]


def test_busy_warning_only_above_the_core_count() -> None:
    assert busy_warning({"cpu_count": 2, "load_average_1_5_15": [1.5, 1, 1], "load_average_after": [2.0, 1, 1]}) is None
    msg = busy_warning({"cpu_count": 2, "load_average_1_5_15": [1.0, 1, 1], "load_average_after": [3.5, 1, 1]})
    assert msg and "3.5" in msg and "2 cores" in msg


def test_busy_warning_from_other_processes_cpu_use() -> None:
    """Other processes busy while timing warn even at a low load average; a high load average with other
    processes quiet (this job's own threads, or the stage before it) does not warn when that is measured."""
    quiet = {"cpu_count": 2, "load_average_1_5_15": [0.5, 1, 1], "load_average_after": [1.0, 1, 1]}
    assert busy_warning({**quiet, "other_cores": 0.1}) is None
    msg = busy_warning({**quiet, "other_cores": 0.8})
    assert msg and "0.80 of 2 cores" in msg
    assert busy_warning({**quiet, "load_average_after": [2.6, 1, 1], "other_cores": 0.05}) is None
    msg = busy_warning({**quiet, "load_average_after": [2.6, 1, 1], "other_cores": None})
    assert msg and "2.6" in msg


def test_other_cores_counts_what_other_processes_ran_and_not_this_ones() -> None:
    start = {"busy_seconds": 100.0, "own_seconds": 5.0, "wall_seconds": 10.0}
    end = {"busy_seconds": 106.0, "own_seconds": 8.0, "wall_seconds": 12.0}
    assert other_cores(start, end) == pytest.approx(1.5)  # 6 busy seconds, 3 of them ours, over 2 s
    assert other_cores(None, end) is None and other_cores(end, start) is None
    if cpu_clock() is None:
        pytest.skip("no /proc/stat here")
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    clock = cpu_clock()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.4:  # this process's own work is read as its own, so not "other"
        pass
    assert cpu_clock()["own_seconds"] - clock["own_seconds"] >= 0.38
    child = subprocess.Popen([sys.executable, "-c", spin])
    clock = cpu_clock()
    time.sleep(0.9)  # read before waiting for it: a process this one has not waited for counts as other
    busy = other_cores(clock, cpu_clock())
    child.wait()
    assert busy > 0.35, busy


def test_tiny_bench_writes_reports(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tensorboard_scalars(tiny_run / "tb")
    path = run_bench(compose_cfg(tiny_run, *TINY_BENCH))
    out = tiny_run / "bench"
    assert path == out / "bench.json"
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(path.read_text())
    assert {"platform", "cpu_count", "mindspore", "device", "load_average_after", "other_cores"} <= set(report["machine"])
    assert report["machine"]["other_cores"] is None or report["machine"]["other_cores"] >= 0
    assert "other processes kept" in (out / "bench.md").read_text() or report["machine"]["other_cores"] is None
    assert report["peak_gflops"]["numpy_matmul"] > 0 and report["peak_gflops"]["mindspore_matmul"] > 0
    flops = {m["name"]: m["forward_flops_per_image"] for m in report["models"]}
    assert flops["student"] > flops["teacher"] > 0  # same backbone, plus the guidance embedding
    (row,) = report["results"]
    assert row["batch"] == 2
    got = {(e["model"], e["engine"], e["steps"]): e for e in row["entries"]}
    assert set(got) == {("teacher", "step", 2), ("student", "step", 2), ("teacher", "eager", 2), ("student", "eager", 2),
                        ("student_2step", "step", 2)}  # the run's progressive round at its own steps
    for (model, _, steps), e in got.items():
        assert len(e["seconds"]) == 2 and e["evals_per_image"] == (2 if model == "teacher" else 1) * steps
        for key in ("seconds_per_image", "images_per_s", "ms_per_step"):
            assert {"median", "min", "max", "iqr", "q25", "q75"} <= set(e[key])
        expected = flops[model] * e["evals_per_image"] * 2 / np.median(e["seconds"]) / 1e9
        assert e["gflops"] == pytest.approx(expected)
    r = row["ratios"]["one_pass_vs_two_pass_2steps"]
    teacher, student = got[("teacher", "step", 2)]["seconds"], got[("student", "step", 2)]["seconds"]
    assert r["median_ratio"] == pytest.approx(np.median(teacher) / np.median(student)) and r["limit"] == 2.0
    assert {"student_step_vs_eager_2steps", "teacher_step_vs_eager_2steps"} <= set(row["ratios"])
    table = (out / "bench.md").read_text()
    assert ("| batch | threads | model | engine | steps | ms/step | images/s | GFLOP/s | % numpy peak | compile s |"
            in table)
    assert row["cpu_threads"] == "default" and report["best_threads"] is None
    assert table.splitlines()[-1] in capsys.readouterr().out
    # the run's TensorBoard log gains the bench's scalars, with the values of the report
    added = {tag: v for tag, v in tensorboard_scalars(tiny_run / "tb").items()
             if tag.startswith("bench/") and len(v) > len(before.get(tag, []))}
    assert added, "no bench scalars written to TensorBoard"
    logged = added["bench/speedup/one_pass_vs_two_pass_2steps"][-1]
    assert logged[0] == 2 and logged[1] == pytest.approx(r["median_ratio"], rel=1e-6)


def test_few_step_student_is_benched_against_the_teacher(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")  # the run's 2-step round descends from its student
    cfg = compose_cfg(run, *TINY_BENCH, "bench.repeats=1", "bench.eager_models=[]")
    report = json.loads(run_bench(cfg).read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "student", "student_2step"]
    (row,) = report["results"]
    assert {(e["model"], e["engine"], e["steps"]) for e in row["entries"]} == {
        ("teacher", "step", 2), ("student", "step", 2), ("student_2step", "step", 2)}
    r = row["ratios"]["student_2step_vs_teacher_2steps"]
    assert r["limit"] == 2.0 and "student_step_vs_eager_2steps" not in row["ratios"]  # 2 x 2 steps / 2 steps
    assert report["models"][2]["checkpoint"] == str(run / "progressive" / "steps_2" / "checkpoint.safetensors")


@pytest.mark.slow
def test_small_batches_are_timed_again_with_one_thread_in_a_child(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "run")
    cfg = compose_cfg(run, *TINY_BENCH, "bench.batch_sizes=[2,3]", "bench.single_thread_max_batch=2",
                      "bench.eager_models=[student]")
    report = json.loads(run_bench(cfg).read_text())
    assert [(r["batch"], r["cpu_threads"]) for r in report["results"]] == [(2, "default"), (3, "default"), (2, "1")]
    assert set(report["peak_gflops_by_threads"]) == {"default", "1"}
    child = report["results"][2]
    assert {e["model"] for e in child["entries"]} == {"teacher", "student", "student_2step"}
    assert all(len(e["seconds"]) == 2 for e in child["entries"])
    # per batch, each entry's fastest thread count, and the ratios recomputed from those entries
    best = {b["batch"]: b for b in report["best_threads"]}
    assert set(best) == {2, 3} and set(best[3]["threads"].values()) == {"default"}
    rows = {(r["batch"], r["cpu_threads"]): {f"{e['model']}/{e['engine']}/{e['steps']}": e for e in r["entries"]}
            for r in report["results"]}
    fastest = {}
    for key, threads in best[2]["threads"].items():
        mine = np.median(rows[(2, threads)][key]["seconds"])
        other = np.median(rows[(2, "1" if threads == "default" else "default")][key]["seconds"])
        assert mine <= other
        fastest[key] = rows[(2, threads)][key]["seconds"]
    r = best[2]["ratios"]["one_pass_vs_two_pass_2steps"]
    assert r["median_ratio"] == pytest.approx(np.median(fastest["teacher/step/2"]) / np.median(fastest["student/step/2"]))
    assert "fastest thread count" in (run / "bench" / "bench.md").read_text()


@pytest.mark.parametrize("override", ["bench.single_thread_max_batch=0", "bench.batch_sizes=[]", "bench.step_counts=[0]", "bench.batch_sizes=[4,-1]",
                                      "bench.repeats=0", "bench.reference_steps=0",
                                      "bench.engine=eager", "bench.reference_steps=3",
                                      "bench.eager_models=[pupil]"])
def test_bad_config_is_a_user_error(tmp_path: Path, override: str) -> None:
    with pytest.raises(UserError) as e:
        run_bench(compose_cfg(tmp_path, override))
    assert "bench:" in str(e.value) and "\n" not in str(e.value)
