"""Bad input end to end: `python -m distill task=... bad=...` exits 2 with one `error:` line and changes no checkpoint.

Every row runs the real CLI in a subprocess (the rows run three at a time to keep the module
quick). Rows that point at a trained run get their own copy of it: a finished tiny teacher and
student (4 steps each) and a published bundle. the README's "Bad inputs" section lists these rows with the
in-process tests of the same inputs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_RUN
from distill.core.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Row:
    name: str
    args: tuple[str, ...]
    message: str              # expected start of the text after "error: "; {run} = the row's run_dir
    start: str = "trained"    # run_dir: a copy of the trained run | "teacher" (its teacher only) | "empty"


def _has_gpu() -> bool:
    import mindspore.device_context as dc

    return bool(dc.gpu.is_available())


def _rows(files: Path) -> list[Row]:
    return [
        Row("unknown task", ("task=nonsense",), "unknown task 'nonsense' (choose one of: teacher,"),
        Row("unknown device", ("task=teacher", "device=TPU"), "device 'TPU' is not one of CPU, GPU, Ascend"),
        *([] if _has_gpu() else [
            Row("device not available here", ("task=teacher", "device=GPU"),
                "device 'GPU' is not available here (this MindSpore build or machine has no GPU")]),
        Row("bf16 on CPU", ("task=teacher", "precision=bf16"), "precision=bf16 needs Ascend (device is CPU)"),
        Row("distributed without msrun", ("task=teacher", "distributed=true"),
            "distributed=true needs a launcher: start the workers with msrun"),
        Row("unknown jit level", ("task=teacher", "graph_mode_options.jit_level=O3"),
            "graph_mode_options.jit_level 'O3' is not one of O0, O1"),
        Row("data folder missing", ("task=teacher", "data=mnist", f"data.root={files / 'nowhere'}"),
            f"data: root {files / 'nowhere'} is not a folder"),
        Row("data file in the wrong format", ("task=teacher", "data=mnist", f"data.root={files / 'bad_mnist'}"),
            f"data: {files / 'bad_mnist' / 'train-images-idx3-ubyte'} is not an IDX image file"),
        Row("image size the model cannot take", ("task=teacher", "data.image_size=7"),
            "model: image size 7 cannot be halved"),
        Row("p_uncond out of range", ("task=teacher", "teacher.train.steps=6", "teacher.p_uncond=1.5"),
            "teacher: p_uncond 1.5 must be in [0, 1)"),
        Row("training value of the wrong type", ("task=teacher", "teacher.train.steps=many"),
            "config: Error merging override teacher.train.steps=many: Value 'many' of type 'str' could not be "
            "converted to Integer (key teacher.train.steps)", start="empty"),
        Row("non-integer batch size", ("task=distill", "student.train.batch_size=abc"),
            "config: Error merging override student.train.batch_size=abc: Value 'abc' of type 'str' could not be "
            "converted to Integer (key student.train.batch_size)"),
        Row("non-integer seed", ("task=teacher", "seed=abc"), "config: Error merging override seed=abc:"),
        Row("non-integer progressive steps", ("task=progressive", "progressive.start_steps=abc"),
            "config: Error merging override progressive.start_steps=abc:"),
        Row("a key the config does not have", ("task=teacher", "teacher.nonexistent=1"),
            "config: Could not override 'teacher.nonexistent': Key 'nonexistent' not in 'TeacherConfig'",
            start="empty"),
        Row("a key added with +", ("task=teacher", "+teacher.train.stepz=9"),
            "config: unknown key teacher.train.stepz (the keys of TrainConfig are:", start="empty"),
        Row("a group option that does not exist", ("task=teacher", "data=foo"),
            "config: In 'config': Could not find 'data/foo' Available options in 'data': cifar10 digits", start="empty"),
        Row("zero samples", ("task=evaluate", "eval.num_samples=0"), "eval.num_samples=0 must be an integer >= 1"),
        Row("zero sampler batch", ("task=evaluate", "sampler.batch_size=0"),
            "sampler.batch_size=0 must be an integer >= 1"),
        Row("zero GroupNorm groups", ("task=teacher", "model.groups=0"), "model.groups=0 must be an integer >= 1"),
        Row("empty evaluation grid", ("task=evaluate", "eval.ws=[]"), "eval.ws is empty"),
        Row("resume with other settings", ("task=distill", *TINY_RUN, "student.w_max=3", "student.loss=eps"),
            "{run}/student/checkpoint.safetensors was made with other settings: student.loss x_snr_trunc vs eps; "
            "student.w_max 5.0 vs 3.0 (checkpoint vs now); set restart=true"),
        Row("fewer steps than the checkpoint has", ("task=teacher", "teacher.train.steps=2"),
            "{run}/teacher/checkpoint.safetensors was made with other settings: steps 4 done vs 2 asked"),
        Row("bundle config.json that is a list", ("task=sample", f"sample.bundle={files / 'list_bundle'}"),
            f"{files / 'list_bundle' / 'config.json'} is not a guidance-distilled-student config (a JSON list"),
        Row("w range reversed", ("task=distill", "student.w_min=3", "student.w_max=1"),
            "student: w range [3.0, 1.0] must satisfy"),
        Row("unknown distillation target", ("task=distill", "student.target=cfgx"),
            "student: unknown target 'cfgx' (choose cfg, interval, cfgpp)"),
        Row("a target's default that is not a number", ("task=distill", "student.by_target.cfg.w_power=abc"),
            "config: While dereferencing interpolation"),
        Row("CFG++ target with a lambda range outside [0, 1]", ("task=distill", "student.target=cfgpp",
                                                                "student.lambda_range=[0,2]"),
            "student.lambda_range=[0, 2] must satisfy 0 <= lo <= hi <= 1 (CFG++ lambda lies in [0, 1])"),
        Row("interval target with a reversed interval", ("task=targets", "student.target=interval",
                                                          "student.interval=[0.9,0.1]"),
            "student.interval: [0.9, 0.1] must be [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1"),
        Row("w outside the bundle's range", ("task=sample", "sample.w=9"), "w=9 is outside the distilled range"),
        Row("resume into a run of another model", ("task=teacher", "model.channels=16"),
            "{run}/teacher/checkpoint.safetensors was made with other settings: model.channels 8 vs 16 (checkpoint vs "
            "now)"),
        Row("teacher of another architecture", ("task=distill", "model.channels=16"),
            "teacher {run}/teacher/checkpoint.safetensors has another architecture"),
        Row("corrupt checkpoint", ("task=distill", f"teacher.checkpoint={files / 'garbage.safetensors'}"),
            f"checkpoint {files / 'garbage.safetensors'} is corrupt or not a safetensors file"),
        Row("no teacher yet", ("task=distill",), "teacher checkpoint not found: {run}/teacher/", start="empty"),
        Row("no student yet", ("task=evaluate",), "student checkpoint not found: {run}/student/", start="teacher"),
        Row("no negative-phase student yet", ("task=evaluate",),
            "student checkpoint not found: {run}/student_negative/checkpoint.safetensors (run task=negative_phase first "
            "or set negative_phase.enabled=false"),
        Row("negative w in the evaluation grid", ("task=evaluate", "eval.ws=[1.0,-1.0]", "eval.num_samples=10"),
            "guidance weight w=-1.0 must be a finite number >= 0"),
        Row("images that are not square", ("task=teacher", "data=folder", f"data.root={files / 'wide_images'}"),
            "model: images must be square, got 6x8"),
        Row("non-finite loss (absurd lr)", ("task=teacher", "teacher.train.lr=1e30", "restart=true"),
            "training: loss became non-finite"),
        Row("progressive steps that halving does not reach", ("task=pipeline", "progressive.min_steps=3"),
            "progressive: halving start_steps 4 skips min_steps 3", start="empty"),
        Row("a bundle variant that does not exist", ("task=sample", "sample.variant=8step"),
            "bundle has no variant '8step' (it has: 4step, 2step)"),
        Row("a negative class equal to the target class",
            ("task=sample", "sample.classes=[3]", "sample.negative_class=3"), "negative class 3 equals a target class"),
        Row("a negative class out of range", ("task=sample", "sample.negative_class=10"),
            "sample.negative_class: 10 is neither a class index in [0, 10)"),
        Row("a negative class asked of an older bundle",
            ("task=sample", f"sample.bundle={files / 'old_bundle'}", "sample.negative_class=8"),
            "this bundle's student takes no negative class"),
        Row("bundle with a wrong checksum", ("task=sample", f"sample.bundle={files / 'tampered_bundle'}"),
            "checksum mismatch for model.safetensors"),
        Row("a flipped byte in a teacher checkpoint", ("task=distill", f"teacher.checkpoint={files / 'flipped.safetensors'}"),
            f"checkpoint {files / 'flipped.safetensors'} fails its SHA-256 check"),
        Row("a student with NaN weights", ("task=evaluate", f"eval.student={files / 'nan_student.safetensors'}"),
            f"checkpoint {files / 'nan_student.safetensors'} holds non-finite weights"),
        Row("an untrained evaluation classifier", ("task=evaluate", "eval.classifier.steps=0", "eval.num_samples=10",
                                                   "negative_phase.enabled=false"),  # the trained run has no phase
            "eval classifier {run}/eval_classifier/classifier.safetensors: held-out accuracy"),
        Row("a run name with a path in it", ("task=teacher", "run_name=../elsewhere"),
            "run_name: name '../elsewhere' is used in file names"),
    ]


def _flip_middle_byte(raw: bytes) -> bytes:
    """``raw`` with one bit of its middle byte flipped."""
    flipped = bytearray(raw)
    flipped[len(flipped) // 2] ^= 0x01
    return bytes(flipped)


def _bad_bundle(bundle: Path, dest: Path, name: str, content: bytes, *, manifest: bool) -> None:
    """A copy of ``bundle`` at ``dest`` whose file ``name`` holds ``content``. ``manifest``: the manifest is
    rewritten to match (the content itself is what is wrong); otherwise it keeps the old checksums."""
    from student.bundle import write_manifest

    shutil.copytree(bundle, dest)
    (dest / name).write_bytes(content)
    if manifest:
        write_manifest(dest)


def _without_negative_keys(node: Any) -> Any:
    """A bundle config as published before negative classes existed: no key that names them, at any depth."""
    if isinstance(node, dict):
        return {k: _without_negative_keys(v) for k, v in node.items() if "negative" not in k}
    return [_without_negative_keys(v) for v in node] if isinstance(node, list) else node


def _checkpoints(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.suffix in (".safetensors", ".mindir")}


@dataclass
class Outcome:
    row: Row
    returncode: int
    stderr: str
    before: dict[str, tuple[bytes, int]]
    after: dict[str, tuple[bytes, int]]
    run: Path


@pytest.fixture(scope="module")
def outcomes(published_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("cli_errors")
    trained = Path(shutil.copytree(published_run, root / "trained"))  # the tiny run with its bundle in trained/bundle
    files = root / "files"
    (files / "bad_mnist").mkdir(parents=True)
    (files / "bad_mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(60))
    (files / "bad_mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(8))
    (files / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    for label in ("a", "b"):
        (files / "wide_images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 6), 40 * i).save(files / "wide_images" / label / f"{i}.png")
    (files / "flipped.safetensors").write_bytes(
        _flip_middle_byte((trained / "teacher" / "checkpoint.safetensors").read_bytes()))
    tensors, meta = load_checkpoint(trained / "student" / "checkpoint.safetensors")
    tensors = {k: np.full_like(v, np.nan) if k.startswith("ema.") else v for k, v in tensors.items()}
    save_checkpoint(files / "nan_student.safetensors", tensors, meta)
    bundle = trained / "bundle"
    _bad_bundle(bundle, files / "list_bundle", "config.json", b"[]", manifest=True)
    _bad_bundle(bundle, files / "old_bundle", "config.json",
                json.dumps(_without_negative_keys(json.loads((bundle / "config.json").read_text()))).encode(),
                manifest=True)
    _bad_bundle(bundle, files / "tampered_bundle", "model.safetensors",
                _flip_middle_byte((bundle / "model.safetensors").read_bytes()), manifest=False)

    def run(row: Row, index: int) -> Outcome:
        work = root / f"row{index}"
        run_dir = work / "run"
        if row.start == "trained":
            shutil.copytree(trained, run_dir)
        elif row.start == "teacher":
            shutil.copytree(trained / "teacher", run_dir / "teacher")
        else:
            run_dir.mkdir(parents=True)
        before = _checkpoints(files) | _checkpoints(run_dir)
        proc = subprocess.run([sys.executable, "-m", "distill", *TINY, *row.args, f"run_dir={run_dir}"],
                              cwd=work, env=dict(os.environ, GLOG_v="3"), capture_output=True, text=True,
                              timeout=300)
        return Outcome(row, proc.returncode, proc.stderr, before, _checkpoints(files) | _checkpoints(run_dir), run_dir)

    rows = _rows(files)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, rows, range(len(rows))))
    return {result.row.name: result for result in results}


@pytest.mark.parametrize("name", [row.name for row in _rows(Path("files"))])
def test_bad_input_exits_2_with_one_error_line_and_keeps_checkpoints(name: str, outcomes) -> None:
    out = outcomes[name]
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    expected = "error: " + out.row.message.replace("{run}", str(out.run))
    assert lines[0].startswith(expected), lines[0]
    assert {k: out.after.get(k) for k in out.before} == out.before, "an existing checkpoint changed"
    if out.row.start != "empty":
        assert any(k.startswith("teacher/") for k in out.before), "no existing checkpoint to protect"


def test_config_errors_touch_nothing_and_keep_a_wanted_traceback(tmp_path: Path) -> None:
    """Hydra's own errors (a key or group option it does not know) end as one line before anything runs;
    HYDRA_FULL_ERROR=1 still gives the whole traceback."""
    args = [sys.executable, "-m", "distill", "task=teacher", "teacher.nonexistent=1", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, GLOG_v="3"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: config: Could not override 'teacher.nonexistent'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()
    proc = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, GLOG_v="3", HYDRA_FULL_ERROR="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "nonexistent" in proc.stderr
