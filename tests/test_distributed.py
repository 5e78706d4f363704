"""Data parallel under msrun: 2 CPU workers train the tiny teacher like one process on the same global batch."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from distill.core.checkpoint import load_checkpoint

VENV_BIN = str(Path(sys.executable).parent)
QUICK_CHECK = ["teacher.check.ws=[1.0]"]  # the post-training check at one w only (it runs on rank 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv_first() -> dict[str, str]:
    # msrun starts every worker with the `python` on PATH.
    return dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")


@pytest.mark.slow
def test_two_workers_match_one_process_and_write_once(tmp_path: Path) -> None:
    dist_run, single_run, logs = tmp_path / "dist", tmp_path / "single", tmp_path / "logs"
    args = ["task=teacher", *TINY, *QUICK_CHECK]
    msrun = [os.path.join(VENV_BIN, "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}",
             "python", "-m", "distill", *args, "distributed=true", f"run_dir={dist_run}"]
    (tmp_path / "d").mkdir()
    (tmp_path / "s").mkdir()
    dist = subprocess.Popen(msrun, cwd=tmp_path / "d", env=env_with_venv_first(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "distill", *args, f"run_dir={single_run}"], cwd=tmp_path / "s",
                            env=env_with_venv_first(), capture_output=True, text=True, timeout=240)
    dist_out, _ = dist.communicate(timeout=240)
    worker_logs = {r: (logs / f"worker_{r}.log").read_text() for r in (0, 1)}
    assert dist.returncode == 0, dist_out[-3000:] + worker_logs[0][-3000:] + worker_logs[1][-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

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

    # rank 0 alone wrote: one checkpoint, one report, one TensorBoard file, one Hydra config copy
    files = sorted(str(p.relative_to(dist_run)) for p in dist_run.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("teacher/")] == [
        "teacher/checkpoint.safetensors", "teacher/report.json", "teacher/samples_w1.npz", "teacher/samples_w1.png"]
    assert len([f for f in files if f.startswith("tb/")]) == 1, files
    assert not [p for p in tmp_path.rglob("*") if re.search(r"rank_?\d|\.tmp$", p.name)]
    assert len(list((tmp_path / "d").rglob("config.yaml"))) == 1
    assert "Traceback" not in worker_logs[1] and "error:" not in worker_logs[1]
