"""One writer per run dir, real failing writes, and the clean-up after interrupted ones (issue 20, items 5, 8, 9)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, compose_cfg, file_size_limit
from distill.core.checkpoint import save_checkpoint
from distill.core.errors import UserError
from distill.core.fileio import check_name, clean_leftovers, staged_folder, write_json
from distill.core.runlock import LOCK_NAME, run_lock


# ----------------------------------------------------------------------------- the run dir's lock


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    with run_lock(tmp_path, "teacher"):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["task"] == "teacher"
        with pytest.raises(UserError, match=rf"run dir .* is in use by pid {os.getpid()} on .*task=teacher"):
            with run_lock(tmp_path, "distill"):
                pass
    with run_lock(tmp_path, "distill"):  # released: the next run takes it
        pass
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, caplog) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from distill.core.runlock import run_lock\n"
        f"with run_lock(Path({str(tmp_path)!r}), 'teacher'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
        with run_lock(tmp_path, "distill"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # the dead owner is still named
    with run_lock(tmp_path, "distill"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {holder.pid}" in caplog.text


def _distill(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", *TINY, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, GLOG_v="3"))


@pytest.mark.slow
def test_two_runs_on_one_run_dir_the_second_is_refused(tmp_path: Path) -> None:
    """The issue's case: two runs on one run dir used to overwrite each other's checkpoints."""
    run = tmp_path / "run"
    first = _distill("task=teacher", "teacher.train.steps=400", f"run_dir={run}", cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / LOCK_NAME).is_file() or not (run / LOCK_NAME).read_text():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.1)
    second = _distill("task=teacher", f"run_dir={run}", cwd=tmp_path)
    err = second.communicate(timeout=120)[1]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode == 2
    assert err.strip().splitlines()[-1].startswith(f"error: run dir {run} is in use by pid {first.pid}"), err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- names that become paths


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "x y"])
def test_names_used_in_paths_are_checked(name: str) -> None:
    with pytest.raises(UserError, match="used in file names"):
        check_name(name, "run_name")
    assert check_name("digits-2.v1_x", "run_name") == "digits-2.v1_x"


def test_run_name_with_a_path_is_refused_before_hydra_makes_the_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    proc = _distill("task=teacher", "run_name=../escaped", cwd=tmp_path / "sub")
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2 and err.strip() == (
        "error: run_name: name '../escaped' is used in file names: letters, digits, _ . - only "
        "(not empty, no path separator, no leading dot)")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "sub" / "outputs").exists()


# ----------------------------------------------------------------------------- real failing writes


def test_a_checkpoint_write_that_fails_for_real_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    """Not a mock of the writer: the file system refuses the bytes (the safetensors writer used to
    raise its own error type here, which ended in a traceback)."""
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"w": np.zeros(4, np.float32)}, {"step": 1})
    good = path.read_bytes()
    with file_size_limit(10_000), pytest.raises(UserError) as e:
        save_checkpoint(path, {"w": np.zeros(100_000, np.float32)}, {"step": 2})
    assert str(e.value) == f"could not write {path}: File too large"
    assert path.read_bytes() == good and os.listdir(tmp_path) == [path.name]


def test_a_bundle_write_that_fails_for_real_names_the_file_and_leaves_no_partial_folder(tmp_path: Path) -> None:
    import mindspore as ms

    dest = tmp_path / "bundle"
    with file_size_limit(10_000), pytest.raises(UserError) as e:
        with staged_folder(dest, overwrite=False) as tmp:
            ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.zeros(100_000, np.float32))}],
                               str(tmp / "model.safetensors"), format="safetensors")
    assert str(e.value).startswith(f"could not write {dest}") and str(e.value).endswith("File too large")
    assert os.listdir(tmp_path) == []


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = _distill("task=teacher", f"run_dir={blocker / 'run'}", cwd=tmp_path)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2 and err.strip() == f"error: could not write {blocker / 'run' / LOCK_NAME}: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match=rf"could not write {folder}/report.json: Permission denied"):
            write_json(folder / "report.json", {})
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- interrupted writes


def test_leftovers_of_interrupted_writes_are_cleaned_and_a_replaced_bundle_is_restored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with staged_folder(run / "bundle", overwrite=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"old weights")
    # kill -9 in the middle of publish.overwrite=true: the old bundle moved aside, the new one half built
    os.rename(run / "bundle", run / ".bundle.old-1a2b3c4d")
    (run / ".bundle.partial-x8y7z6w5").mkdir()
    (run / ".bundle.partial-x8y7z6w5" / "model.safetensors").write_bytes(b"half")
    (run / "student").mkdir()
    (run / "student" / ".checkpoint.safetensors.tmp-abc123.safetensors").write_bytes(b"half a checkpoint")
    (run / "student" / "checkpoint.safetensors").write_bytes(b"kept")
    (run / "evaluate").mkdir()
    (run / "evaluate" / ".report.json.tmp-q1w2e3.tmp").write_text("{")
    (run / ".hydra").mkdir()  # not ours: left alone
    clean_leftovers(run)
    assert (run / "bundle" / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        ".hydra", "bundle", "bundle/model.safetensors", "evaluate", "student", "student/checkpoint.safetensors"]


def test_an_interrupted_overwrite_after_the_swap_keeps_the_new_bundle(tmp_path: Path) -> None:
    with staged_folder(tmp_path / "bundle", overwrite=False) as tmp:
        (tmp / "f").write_text("new")
    (tmp_path / ".bundle.old-99aa88bb").mkdir()  # killed while removing the replaced bundle
    (tmp_path / ".bundle.old-99aa88bb" / "f").write_text("old")
    with staged_folder(tmp_path / "bundle", overwrite=True) as tmp:
        (tmp / "f").write_text("newer")
    assert sorted(os.listdir(tmp_path)) == ["bundle"] and (tmp_path / "bundle" / "f").read_text() == "newer"


def test_the_entry_point_cleans_the_run_dir_under_its_lock(tmp_path: Path) -> None:
    """``task=...`` on a run dir with leftovers: they are gone before the job runs, the lock is released after."""
    from distill.app import run

    stale = tmp_path / "teacher" / ".checkpoint.safetensors.tmp-zz9x8c.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    with pytest.raises(SystemExit) as e:  # the job then fails on purpose (a missing file), after the clean-up
        run(compose_cfg(tmp_path, "task=teacher", f"teacher.checkpoint={tmp_path / 'absent.safetensors'}"))
    assert e.value.code == 2 and not stale.exists()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with run_lock(tmp_path, "next"):
        pass


def test_under_msrun_only_rank_0_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker of a data-parallel run neither takes nor waits for the run dir's lock (rank 0 holds it)."""
    import distill.app as app

    monkeypatch.setattr(app, "setup_from_config", lambda cfg: None)
    monkeypatch.setattr(app, "is_main", lambda: False)
    with run_lock(tmp_path, "teacher"):  # rank 0's lock
        assert app.run(compose_cfg(tmp_path, "task=bench")) is None  # a rank-0-only task: skipped, not refused
    monkeypatch.setattr(app, "is_main", lambda: True)
    with run_lock(tmp_path, "teacher"), pytest.raises(SystemExit):
        app.run(compose_cfg(tmp_path, "task=bench"))


def test_a_write_outside_the_atomic_writers_fails_in_one_line(tmp_path: Path) -> None:
    """TensorBoard's event file cannot be made (a file where its folder should be): the entry point's
    catch-all names it in one line instead of a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("a file, not a folder")
    proc = _distill("task=teacher", "teacher.train.steps=2", f"run_dir={run}", cwd=tmp_path)
    err = proc.communicate(timeout=300)[1].strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: could not read or write {run}/tb/") and err.endswith(": Not a directory"), err
