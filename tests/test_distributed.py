"""Data parallel under msrun: 2 CPU workers train the tiny teacher like one process on the same global batch
(from arrays and from a streamed image folder), and split the target shards and the evaluation's samples,
writing what one process writes."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, TINY_RUN
from distill.core.checkpoint import load_checkpoint
from distill.core.fileio import sha256

VENV_BIN = str(Path(sys.executable).parent)
# the post-training check at one w: 50 samples in chunks of 20, split over the workers (rank 0 judges them)
QUICK_CHECK = ["teacher.check.ws=[1.0]", "teacher.check.num_samples=50"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv_first() -> dict[str, str]:
    # msrun starts every worker with the `python` on PATH.
    return dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")


@pytest.mark.slow
def test_two_workers_match_one_process_and_write_once(tmp_path: Path) -> None:
    dist_run, single_run, worker_logs = run_both(tmp_path, None, ["task=teacher", *TINY, *QUICK_CHECK], timeout=240)

    # both ranks end with the same weights (each logs a digest of its weights at the end of training)
    digests = [re.findall(r"rank (\d) of 2 ends at step 4 with weights digest (\w+)", worker_logs[r]) for r in (0, 1)]
    assert digests[0] == [("0", digests[0][0][1])] and digests[1] == [("1", digests[0][0][1])], digests

    # the global batch is the single-process batch: same losses and (up to float rounding) the same weights
    dist_ckpt, meta = load_checkpoint(dist_run / "teacher" / "checkpoint.safetensors")
    single_ckpt, _ = load_checkpoint(single_run / "teacher" / "checkpoint.safetensors")
    assert meta["step"] == 4 and meta["data_parallel_workers"] == 2
    np.testing.assert_allclose(dist_ckpt["losses"], single_ckpt["losses"], rtol=1e-5)
    for key, value in single_ckpt.items():
        if key.startswith(("net.", "ema.")):
            np.testing.assert_allclose(dist_ckpt[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

    # the check's samples, drawn by both workers, are those of one process (up to the weights' float rounding)
    dist_samples, single_samples = (np.load(r / "teacher" / "samples_w1.npz") for r in (dist_run, single_run))
    assert len(dist_samples["images"]) == 50
    np.testing.assert_array_equal(dist_samples["labels"], single_samples["labels"])
    assert np.abs(dist_samples["images"].astype(int) - single_samples["images"].astype(int)).max() <= 1
    reports = [json.loads((r / "teacher" / "report.json").read_text()) for r in (dist_run, single_run)]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[0]["data_parallel_workers"] == 2

    # rank 0 alone wrote: one checkpoint, one report, one TensorBoard file, one Hydra config copy
    files = sorted(str(p.relative_to(dist_run)) for p in dist_run.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("teacher/")] == [
        "teacher/checkpoint.safetensors", "teacher/report.json", "teacher/samples_w1.npz", "teacher/samples_w1.png",
        "teacher/train_summary.json"]
    assert len([f for f in files if f.startswith("tb/")]) == 1, files
    assert not [p for p in tmp_path.rglob("*") if re.search(r"rank_?\d|\.tmp$", p.name)]
    assert len(list((tmp_path / "d").rglob("config.yaml"))) == 1


def run_both(tmp_path: Path, run: Path | None, args: list[str], timeout: int = 300
             ) -> tuple[Path, Path, dict[int, str]]:
    """``args`` under msrun with 2 workers on a copy of ``run`` (None: a new run dir), and in one process on
    another copy: (the msrun run dir, the one-process run dir, each worker's log)."""
    import shutil

    dist_run, single_run, logs = tmp_path / "dist", tmp_path / "single", tmp_path / "logs"
    if run is not None:
        shutil.copytree(run, dist_run)
        shutil.copytree(run, single_run)
    msrun = [os.path.join(VENV_BIN, "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}",
             "python", "-m", "distill", *args, "distributed=true", f"run_dir={dist_run}"]
    (tmp_path / "d").mkdir()
    (tmp_path / "s").mkdir()
    dist = subprocess.Popen(msrun, cwd=tmp_path / "d", env=env_with_venv_first(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "distill", *args, f"run_dir={single_run}"], cwd=tmp_path / "s",
                            env=env_with_venv_first(), capture_output=True, text=True, timeout=timeout)
    dist_out, _ = dist.communicate(timeout=timeout)
    worker_logs = {r: (logs / f"worker_{r}.log").read_text() for r in (0, 1)}
    assert dist.returncode == 0, dist_out[-3000:] + worker_logs[0][-3000:] + worker_logs[1][-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert "Traceback" not in worker_logs[1] and "error:" not in worker_logs[1]
    return dist_run, single_run, worker_logs


@pytest.mark.slow
def test_targets_split_over_two_workers_equal_one_process(tiny_run: Path, tmp_path: Path) -> None:
    # 7 steps, 3 a shard: [0, 3), [3, 6), [6, 7); three shards over two workers (an uneven split)
    args = ["task=targets", *TINY, "student.train.steps=7"]
    dist_run, single_run, logs = run_both(tmp_path, tiny_run, args)
    assert "1 shard(s) written by rank 1, 3 by all 2 workers" in logs[1]
    assert "2 shard(s) written by rank 0, 3 by all 2 workers" in logs[0]
    dist_manifest = json.loads((dist_run / "targets" / "manifest.json").read_text())
    single_manifest = json.loads((single_run / "targets" / "manifest.json").read_text())
    assert [(sh["start"], sh["stop"]) for sh in dist_manifest["shards"]] == [(0, 3), (3, 6), (6, 7)]
    assert dist_manifest["fingerprint"] == single_manifest["fingerprint"]
    for sh in dist_manifest["shards"]:
        path = dist_run / "targets" / sh["file"]
        assert sha256(path) == sh["sha256"], sh["file"]  # the checksum of what the writing rank wrote
        got, got_meta = load_checkpoint(path)
        want, want_meta = load_checkpoint(single_run / "targets" / sh["file"])
        assert got_meta == want_meta and got.keys() == want.keys()
        for key, value in want.items():  # bit for bit
            np.testing.assert_array_equal(got[key], value, err_msg=f"{sh['file']}: {key}")


@pytest.mark.slow
def test_evaluate_split_over_two_workers_equals_one_process(tiny_run: Path, tmp_path: Path) -> None:
    # 50 samples in chunks of 20: three chunks over two workers (an uneven split, the last chunk padded)
    args = ["task=evaluate", *TINY, *TINY_RUN, "eval.ws=[0.0,2.0]", "eval.num_samples=50"]
    dist_run, single_run, logs = run_both(tmp_path, tiny_run, args)
    assert "evaluate: rank 1 drew 1 of 3 sample chunks per model and w" in logs[1]
    dist_report = json.loads((dist_run / "evaluate" / "report.json").read_text())
    single_report = json.loads((single_run / "evaluate" / "report.json").read_text())
    assert dist_report["data_parallel_workers"] == 2 and single_report["data_parallel_workers"] == 1
    # float tolerance: the held-out features alone already differ in the 8th digit under msrun
    assert dist_report["real_vs_real_fd"] == pytest.approx(single_report["real_vs_real_fd"], rel=1e-6)
    assert dist_report["models"].keys() == single_report["models"].keys() == {
        "teacher", "student_4step", "student_2step"}
    for name, model in single_report["models"].items():
        for w, metrics in model["per_w"].items():
            for key, value in metrics.items():
                assert dist_report["models"][name]["per_w"][w][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (
                    name, w, key)
    for name, model in single_report["negative"]["models"].items():  # the negative-class draws, split the same way
        for w, per_w in model["per_w"].items():
            for kind in ("null", "negative"):
                for key, value in per_w[kind].items():
                    assert dist_report["negative"]["models"][name]["per_w"][w][kind][key] == pytest.approx(
                        value, rel=1e-6, abs=1e-9), (name, w, kind, key)
    samples = sorted(p.name for p in (single_run / "evaluate" / "samples").glob("*.npz"))
    # per model and w: the class-balanced samples and one file per negative class of eval.negative_classes
    assert len(samples) == 3 * 2 * (1 + 4) and samples == sorted(p.name for p in (dist_run / "evaluate" / "samples").glob("*.npz"))
    for name in samples:
        got, want = np.load(dist_run / "evaluate" / "samples" / name), np.load(single_run / "evaluate" / "samples" / name)
        np.testing.assert_array_equal(got["images"], want["images"], err_msg=name)
        np.testing.assert_array_equal(got["labels"], want["labels"], err_msg=name)


@pytest.mark.slow
def test_two_workers_train_on_a_streamed_folder_like_one_process(tmp_path: Path) -> None:
    """data.stream=true under msrun: each worker reads its half of every global batch through
    ImageFolderDataset (docs/distributed.md); the trained teacher is the one-process streamed teacher."""
    from test_stream import write_rgb_folder

    root = write_rgb_folder(tmp_path / "images", sizes=(8, 8), per_class=20)  # 61 images, 49 for training
    # 4 steps of 16 over 49 images: 3 steps an epoch, so the run crosses into a second epoch's order
    args = ["task=teacher", *TINY, "data=folder", f"data.root={root}", "data.stream=true",
            "data.held_out_fraction=0.2", "teacher.check.ws=[1.0]", "eval.classifier.steps=2",
            "eval.classifier.min_accuracy=0"]
    dist_run, single_run, worker_logs = run_both(tmp_path, None, args, timeout=240)
    for rank in (0, 1):
        assert re.search(r"streaming 49 training images from .* through mindspore\.dataset\.ImageFolderDataset",
                         worker_logs[rank]), worker_logs[rank][-2000:]
    digests = [re.findall(r"rank \d of 2 ends at step 4 with weights digest (\w+)", worker_logs[r]) for r in (0, 1)]
    assert len(digests[0]) == 1 and digests[0] == digests[1], digests
    dist_ckpt, meta = load_checkpoint(dist_run / "teacher" / "checkpoint.safetensors")
    single_ckpt, single_meta = load_checkpoint(single_run / "teacher" / "checkpoint.safetensors")
    assert meta["step"] == single_meta["step"] == 4 and meta["data_parallel_workers"] == 2
    np.testing.assert_allclose(dist_ckpt["losses"], single_ckpt["losses"], rtol=1e-5)
    for key, value in single_ckpt.items():
        if key.startswith(("net.", "ema.")):
            np.testing.assert_allclose(dist_ckpt[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
