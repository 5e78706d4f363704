"""``task=publish`` writes the student as a self-contained bundle; ``task=sample`` samples from one.

The bundle is built in a temporary sibling folder and renamed into place only when every
file is written and the manifest lists them, so a crash never leaves a half bundle; with
``publish.overwrite=true`` the old bundle is moved aside first and restored if the final
rename fails.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distill import build
from distill.checkpoint import read_meta
from distill.errors import UserError
from distill.images import save_grid_png, save_samples_npz, save_side_by_side_png
from student.bundle import (CARD, CONFIG, FORMAT, FORMAT_VERSION, GRID, MINDIR, WEIGHTS, W_CONVENTION, Pretrained,
                            build_net, from_pretrained, save_weights, write_manifest)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic folder
def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if not overwrite:
        raise UserError(f"bundle {dest} already exists (set publish.overwrite=true to replace it)")
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty sibling folder of ``dest``; on success it becomes ``dest``, on failure it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):  # mindspore writes owner-read-only files; a bundle is for sharing
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, dest, overwrite)
    except OSError as e:
        raise UserError(f"could not publish to {dest}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- bundle contents
def bundle_dir(cfg: DictConfig) -> Path:
    d = cfg.publish.get("dir")
    return Path(str(d)).expanduser() if d else build.run_dir(cfg) / "bundle"


def training_info(cfg: DictConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoints say about how the teacher and the student were trained."""
    from teacher.job import teacher_checkpoint_path

    tpath = teacher_checkpoint_path(cfg)
    teacher = read_meta(tpath) if tpath.is_file() else {}
    summary_path = build.run_dir(cfg) / "student" / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"data": meta.get("data"), "teacher_steps": teacher.get("step"), "p_uncond": teacher.get("p_uncond"),
            "student_steps": meta.get("step"), "student_total_steps": meta.get("total_steps"),
            "loss": meta.get("loss"), "w_power": meta.get("w_power", 1.0),
            "w_loss_power": meta.get("w_loss_power", 0.0), "targets": summary.get("targets"),
            "weights": "EMA"}


def bundle_config(cfg: DictConfig, net: Any, meta: dict[str, Any], mindir_batch: int) -> dict[str, Any]:
    import mindspore as ms

    ucfg = net.config
    c, h = ucfg.in_channels, ucfg.image_size
    w_min, w_max = float(meta["w_min"]), float(meta["w_max"])
    settings = build.sampler_settings(cfg)
    w = float(cfg.sampler.w)
    if not w_min <= w <= w_max:
        raise UserError(f"sampler.w={w:g} (the bundle's default) is outside the student's range [{w_min:g}, {w_max:g}]")
    b = int(mindir_batch)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": ucfg.to_dict(),
        "diffusion": {"schedule": meta["schedule"], "prediction": meta["prediction"],
                      "time": "continuous t in [0, 1], variance preserving, parametrised by logSNR"},
        "guidance": {"w_min": w_min, "w_max": w_max, "convention": W_CONVENTION,
                     "w_schedules": ["constant", "linear", "cosine"]},
        "classes": {"names": [str(n) for n in meta["class_names"]], "num_classes": ucfg.num_classes,
                    "null_class": ucfg.num_classes},
        "image": {"channels": c, "height": h, "width": h, "range": [-1.0, 1.0], "layout": "NCHW"},
        "sampler": {"kind": settings.kind, "num_steps": settings.num_steps, "eta": settings.eta, "w": w,
                    "w_schedule": settings.w_schedule, "clip_x0": settings.clip_x0,
                    "dynamic_threshold": settings.dynamic_threshold, "batch_size": int(cfg.sampler.batch_size)},
        "weights": WEIGHTS,
        "mindir": {"file": MINDIR, "batch_size": b, "dynamic_shapes": False,
                   "inputs": [{"name": "x", "shape": [b, c, h, h], "dtype": "float32"},
                              {"name": "t", "shape": [b], "dtype": "float32"},
                              {"name": "y", "shape": [b], "dtype": "int32"},
                              {"name": "w", "shape": [b], "dtype": "float32"}],
                   "output": {"name": meta["prediction"], "shape": [b, c, h, h], "dtype": "float32"}},
        "training": training_info(cfg, meta),
        "created_with": {"mindspore": ms.__version__},
    }


def export_mindir(net: Any, path: Path, batch: int) -> None:
    """The one-pass network ``(x, t, y, w) -> output`` as MINDIR, traced at a fixed batch."""
    import mindspore as ms

    ucfg, rng = net.config, np.random.default_rng(0)
    x = rng.standard_normal((batch, ucfg.in_channels, ucfg.image_size, ucfg.image_size)).astype(np.float32)
    inputs = (ms.Tensor(x), ms.Tensor(np.full(batch, 0.5, np.float32)),
              ms.Tensor(np.arange(batch, dtype=np.int32) % ucfg.num_classes), ms.Tensor(np.ones(batch, np.float32)))
    try:
        ms.export(net, *inputs, file_name=str(path), file_format="MINDIR")
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"MINDIR export failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def read_report(cfg: DictConfig) -> Optional[dict[str, Any]]:
    path = build.run_dir(cfg) / "evaluate" / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the evaluation report {path} ({e})") from e
    return report if isinstance(report, dict) else {"report": report}


def write_sample_grid(model: Pretrained, path: Path, ws: list[float]) -> None:
    labels = np.arange(len(model.class_names))
    rows = [(f"w={w:g}", model.sample(labels, w, seed=0)) for w in ws]
    save_side_by_side_png(rows, path, nrow=len(labels))


def run_publish(cfg: DictConfig) -> Path:
    from distill.data import load_data
    from student.card import model_card
    from student.job import load_student

    p = cfg.publish
    dest, overwrite = bundle_dir(cfg), bool(p.overwrite)
    if dest.exists() and not overwrite:
        raise UserError(f"bundle {dest} already exists (set publish.overwrite=true to replace it)")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder")
    if int(p.mindir_batch) < 1:
        raise UserError(f"publish.mindir_batch={p.mindir_batch} must be >= 1")
    net, meta = load_student(cfg, load_data(cfg.data))
    config = bundle_config(cfg, net, meta, int(p.mindir_batch))
    card_ws = [float(w) for w in p.card_ws]
    lo, hi = config["guidance"]["w_min"], config["guidance"]["w_max"]
    if not card_ws or any(not lo <= w <= hi for w in card_ws):
        raise UserError(f"publish.card_ws {card_ws} must be a non-empty list inside the student's range [{lo:g}, {hi:g}]")
    with staged_folder(dest, overwrite) as tmp:
        save_weights(net, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        model = Pretrained(build_net(config, tmp / WEIGHTS), config, tmp)  # the card's samples come from the files
        export_mindir(model.net, tmp / MINDIR, int(p.mindir_batch))
        write_sample_grid(model, tmp / GRID, card_ws)
        (tmp / CARD).write_text(model_card(config, read_report(cfg), card_ws))
        write_manifest(tmp)
    sizes = {f.name: f.stat().st_size for f in sorted(dest.iterdir())}
    log.info("publish: wrote %s (%s)", dest, ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    return dest


# ----------------------------------------------------------------------------- task=sample
def _classes(spec: Any, names: list[str]) -> list[int]:
    if spec is None:
        return list(range(len(names)))
    out = []
    for c in (list(spec) if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]):
        if isinstance(c, int) and 0 <= c < len(names):
            out.append(c)
        elif str(c) in names:
            out.append(names.index(str(c)))
        else:
            raise UserError(f"sample.classes: {c!r} is neither a class index in [0, {len(names)}) nor a class name")
    if not out:
        raise UserError("sample.classes is empty")
    return out


def _free_name(folder: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so that no existing .png / .npz is overwritten."""
    name, k = stem, 1
    while (folder / f"{name}.png").exists() or (folder / f"{name}.npz").exists():
        k += 1
        name = f"{stem}-{k}"
    return name


def run_sample(cfg: DictConfig) -> Path:
    """Sample a published bundle: a PNG grid (one row per class) and an .npz; returns the .npz path."""
    s = cfg.sample
    model = from_pretrained(Path(str(s.bundle)).expanduser() if s.bundle else build.run_dir(cfg) / "bundle")
    classes = _classes(s.classes, model.class_names)
    per_class = int(s.per_class)
    if per_class < 1:
        raise UserError(f"sample.per_class={per_class} must be >= 1")
    w = float(s.w) if s.w is not None else float(model.config["sampler"]["w"])
    steps = int(s.steps) if s.steps is not None else int(model.config["sampler"]["num_steps"])
    schedule, seed = str(cfg.sampler.w_schedule), int(s.seed)
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    images = model.sample(labels, w, num_steps=steps, seed=seed, w_schedule=schedule,
                          allow_extrapolation=bool(s.get("allow_extrapolation", False)))
    out = Path(str(s.out)).expanduser() if s.out else build.run_dir(cfg) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if schedule == "constant" else f"_{schedule}"
    name = _free_name(out, f"student_w{w:g}{tag}_seed{seed}_steps{steps}")
    save_grid_png(images, out / f"{name}.png", nrow=per_class)
    npz = save_samples_npz(out / f"{name}.npz", images, labels, w=w, w_schedule=schedule, steps=steps, seed=seed,
                           model="student")
    log.info("sample: %d images (%d classes x %d) at w=%g (%s), %d steps, seed %d -> %s.{png,npz}",
             len(labels), len(classes), per_class, w, schedule, steps, seed, out / name)
    return npz
