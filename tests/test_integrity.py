"""Integrity of training checkpoints: a digest of their content checked on load, non-finite weights refused
wherever a teacher or student is loaded (issue 20, item 3)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY_RUN, compose_cfg, copy_run
from distill.core.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.jobs.evaluate import run_evaluate
from distill.jobs.publish import run_publish
from teacher.loading import load_teacher


def _private_run(tiny_run: Path, tmp_path: Path) -> Path:
    return copy_run(tiny_run, tmp_path / "run")


def test_a_flipped_byte_in_a_teacher_checkpoint_is_refused_naming_the_file(tiny_run: Path, tmp_path: Path) -> None:
    """The issue's case: a byte flipped in a tensor of the teacher checkpoint used to be loaded without notice."""
    run = _private_run(tiny_run, tmp_path)
    path = run / "teacher" / CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # in the tensor data: the file still parses
    path.write_bytes(bytes(raw))
    load_file(str(path))  # the file still parses: safetensors alone does not notice
    cfg = compose_cfg(run)
    with pytest.raises(UserError) as e:
        load_teacher(cfg, load_data(cfg.data))
    assert str(e.value) == (f"checkpoint {path} fails its SHA-256 check (the file was altered or is corrupt); "
                            "restore it or remove it to train again")


def test_a_changed_metadata_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"w": np.ones(3, np.float32)}, {"kind": "teacher", "step": 10})
    raw = path.read_bytes().replace(b'\\"step\\": 10', b'\\"step\\": 90')
    assert raw != path.read_bytes()
    path.write_bytes(raw)
    with pytest.raises(UserError, match="fails its SHA-256 check"):
        load_checkpoint(path)


def test_checkpoints_without_a_digest_still_load(tmp_path: Path) -> None:
    """Checkpoints written before the digest existed (no ``sha256`` in the header) are read as before."""
    from safetensors.numpy import save_file

    path = tmp_path / CHECKPOINT_NAME
    save_file({"w": np.ones(3, np.float32)}, str(path), metadata={"meta": json.dumps({"step": 1})})
    tensors, meta = load_checkpoint(path)
    assert meta == {"step": 1} and tensors["w"].tolist() == [1.0, 1.0, 1.0]


def _poison(path: Path) -> str:
    """Rewrite a training checkpoint with NaN in its first EMA tensor (a valid file with a valid digest)."""
    tensors, meta = load_checkpoint(path)
    name = sorted(k for k in tensors if k.startswith("ema."))[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_checkpoint(path, tensors, meta)
    return name[len("ema."):]


def test_a_nan_student_is_neither_evaluated_nor_published(tiny_run: Path, tmp_path: Path) -> None:
    """The issue's case: a NaN student was evaluated (FD 535, black samples) and published, exit 0."""
    run = _private_run(tiny_run, tmp_path)
    path = run / "student" / CHECKPOINT_NAME
    name = _poison(path)
    cfg = compose_cfg(run, *TINY_RUN)
    message = rf"checkpoint {path} holds non-finite weights \(NaN or inf in '{name}'\)"
    with pytest.raises(UserError, match=message):
        run_evaluate(cfg)
    assert not (run / "evaluate").exists() and not (run / "eval_classifier").exists()  # refused before any work
    with pytest.raises(UserError, match=message):
        run_publish(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["progressive", "student", "teacher"]  # no bundle, no leftovers


def test_a_nan_teacher_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    run = _private_run(tiny_run, tmp_path)
    _poison(run / "teacher" / CHECKPOINT_NAME)
    cfg = compose_cfg(run)
    with pytest.raises(UserError, match="holds non-finite weights"):
        load_teacher(cfg, load_data(cfg.data))
