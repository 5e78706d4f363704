"""``task=sample``: images from a published bundle, as a PNG grid (one row per class) and an .npz."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distill.core import build
from distill.core.errors import UserError
from distill.core.images import save_grid_png, save_samples_npz
from student.bundle import from_pretrained

log = logging.getLogger(__name__)


def _classes(spec: Any, names: list[str], what: str = "sample.classes") -> list[int]:
    if spec is None:
        return list(range(len(names)))
    out = []
    for c in (list(spec) if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]):
        if isinstance(c, int) and 0 <= c < len(names):
            out.append(c)
        elif str(c) in names:
            out.append(names.index(str(c)))
        else:
            raise UserError(f"{what}: {c!r} is neither a class index in [0, {len(names)}) nor a class name")
    if not out:
        raise UserError(f"{what} is empty")
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
    variant = None if s.get("variant") is None else str(s.variant)
    folder = Path(str(s.bundle)).expanduser() if s.bundle else build.run_dir(cfg) / "bundle"
    model = from_pretrained(folder, variant)
    negative_variants = model.config["guidance"].get("negative_variants") or []
    if s.get("negative_class") is not None and variant is None and not model.takes_negative and negative_variants:
        log.info("sample: the default variant takes no negative class; using variant %s, which does",
                 negative_variants[0])
        model = from_pretrained(folder, negative_variants[0])
    classes = _classes(s.classes, model.class_names)
    per_class = int(s.per_class)
    if per_class < 1:
        raise UserError(f"sample.per_class={per_class} must be >= 1")
    w = float(s.w) if s.w is not None else float(model.config["sampler"]["w"])
    steps = int(s.steps) if s.steps is not None else int(model.config["sampler"]["num_steps"])
    schedule, seed = str(cfg.sampler.w_schedule), int(s.seed)
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    negative = None if s.get("negative_class") is None else _classes(s.negative_class, model.class_names, "sample.negative_class")[0]
    images = model.sample(labels, w, num_steps=steps, seed=seed, w_schedule=schedule,
                          allow_extrapolation=bool(s.get("allow_extrapolation", False)), negative=negative)
    out = Path(str(s.out)).expanduser() if s.out else build.run_dir(cfg) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    tag = ("" if schedule == "constant" else f"_{schedule}") + ("" if negative is None else f"_neg{negative}")
    name = _free_name(out, f"student_w{w:g}{tag}_seed{seed}_steps{steps}")
    save_grid_png(images, out / f"{name}.png", nrow=per_class)
    extra = {} if negative is None else {"negative_class": negative}
    npz = save_samples_npz(out / f"{name}.npz", images, labels, w=w, w_schedule=schedule, steps=steps, seed=seed,
                           model="student", **extra)
    log.info("sample: %d images (%d classes x %d) at w=%g (%s%s), %d steps (one network call each), seed %d -> "
             "%s.{png,npz}", len(labels), len(classes), per_class, w, schedule,
             "" if negative is None else f", away from class {negative}", steps, seed, out / name)
    return npz
