"""Faults: kill -9 and resume, a non-finite loss, a full disk while writing a checkpoint."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conftest import TINY, file_size_limit
from distill.core.checkpoint import load_checkpoint, read_meta
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.training import CHECKPOINT_NAME, Trainer, TrainSettings
from teacher.objective import regression_loss, teacher_batch_maker
from teacher.unet import UNet, UNetConfig

NET = UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=False, image_size=8, num_classes=10)


def tiny_trainer(out: Path, steps: int, poison_step: int | None = None) -> Trainer:
    """The tiny teacher trainer; ``poison_step``: that step's targets are NaN (a corrupt batch)."""
    data = load_data({"name": "digits", "max_train": 64})
    ms.set_seed(0)
    net, ema = UNet(NET), UNet(NET)
    settings = TrainSettings(steps=steps, batch_size=16, lr=3e-3, ema_decay=0.9, checkpoint_every=2, log_every=2)

    def batches(start: int):
        make = teacher_batch_maker(data, 16, 0, start, "cosine", "v", 0.1)

        def batch(step: int):
            z, t, y, w, y_neg, target, weight = make(step)
            if step == poison_step:
                target = np.full_like(target, np.nan)
            return z, t, y, w, y_neg, target, weight
        return batch

    return Trainer(net, ema, regression_loss, batches, settings, out, {"kind": "teacher", "model": NET.to_dict()})


# ----------------------------------------------------------------------------- (a) kill -9


def _teacher_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "distill", "task=teacher", *TINY, "teacher.train.steps=24",
            "teacher.check.ws=[1.0]", f"run_dir={run_dir}"]


@pytest.mark.slow
def test_kill_9_then_restart_resumes_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = dict(os.environ, GLOG_v="3")
    reference = subprocess.Popen(_teacher_cmd(whole), cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = killed / "teacher" / CHECKPOINT_NAME
    victim = subprocess.Popen(_teacher_cmd(killed), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared before the run ended"
    time.sleep(random.uniform(0.0, 1.0))  # somewhere after the first checkpoint: mid-step, mid-write, ...
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # whatever the moment, the checkpoint on disk is a whole one (atomic writes)
    step_at_kill = int(read_meta(ckpt)["step"])
    assert 2 <= step_at_kill < 24, step_at_kill  # killed while training (22 steps take seconds)

    restart = subprocess.run(_teacher_cmd(killed), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180)
    assert restart.returncode == 0, restart.stderr[-3000:]
    # lost at most one checkpoint interval: it went on from the last checkpoint written before the kill
    assert re.search(rf"resumed from .*{CHECKPOINT_NAME} at step {step_at_kill}\b", restart.stdout), restart.stdout
    assert reference.wait(timeout=180) == 0, reference.stderr.read()[-3000:]

    resumed, _ = load_checkpoint(ckpt)
    uninterrupted, _ = load_checkpoint(whole / "teacher" / CHECKPOINT_NAME)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)  # weights, EMA, Adam moments, losses
    assert (killed / "teacher" / "report.json").is_file()
    assert not list(ckpt.parent.glob(".*tmp"))  # no temp file of an interrupted write left behind


def test_stale_temp_file_of_an_interrupted_write_is_removed_on_restart(tmp_path: Path) -> None:
    tiny_trainer(tmp_path, steps=2).run()
    stale = tmp_path / f".{CHECKPOINT_NAME}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    trainer = tiny_trainer(tmp_path, steps=2)
    assert trainer.try_resume() and trainer.step == 2
    assert not stale.exists()


# ----------------------------------------------------------------------------- (b) non-finite loss


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    tiny_trainer(tmp_path, steps=2).run()
    ckpt = tmp_path / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    trainer = tiny_trainer(tmp_path, steps=6, poison_step=3)
    assert trainer.try_resume() and trainer.step == 2
    with pytest.raises(UserError, match=r"loss became non-finite \(nan\) at step 3.*last good checkpoint kept") as e:
        trainer.run()
    assert "\n" not in str(e.value)
    assert ckpt.read_bytes() == good and read_meta(ckpt)["step"] == 2


# ----------------------------------------------------------------------------- (c) full disk


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    """The file system refuses the checkpoint's bytes part of the way (a real failing write, no mock)."""
    tiny_trainer(tmp_path, steps=2).run()
    ckpt = tmp_path / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    trainer = tiny_trainer(tmp_path, steps=4)
    assert trainer.try_resume()
    with file_size_limit(len(good) // 2), pytest.raises(UserError) as e:
        trainer.run()
    message = str(e.value)
    assert message == f"could not write {ckpt}: File too large"
    assert ckpt.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp file left


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    """Weights that went non-finite with a finite loss (e.g. an overflowing EMA) do not replace the last good checkpoint."""
    trainer = tiny_trainer(tmp_path, steps=2)
    trainer.run()
    ckpt = tmp_path / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    param = trainer.ema.trainable_params()[0]
    param.set_data(ms.Tensor(np.full(param.shape, np.inf, np.float32)))
    with pytest.raises(UserError, match=r"training: weights became non-finite \('ema\..*'\) at step 2; .*last good "
                                         rf"checkpoint kept at {ckpt}"):
        trainer.save()
    assert ckpt.read_bytes() == good
