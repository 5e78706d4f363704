"""``task=publish``: the student as a self-contained bundle (built aside, renamed into place when complete)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import json_text, staged_folder
from distill.core.weights import save_weights
from student.bundle import (CARD, CONFIG, GRID, MINDIR, NEGATIVE_GRID, WEIGHTS, Pretrained, build_net, variant_config,
                            write_manifest)
from student.distill import input_interval
from student.loading import load_student, serving_student_path
from student.model import check_one_head
from student.progressive import verified_rounds
from student.publish import (bundle_config, bundle_dir, export_mindir, export_sampler_mindir, read_report,
                             variant_weights, write_negative_grid, write_sample_grid)
from teacher.loading import teacher_checkpoint_path

log = logging.getLogger(__name__)


def bundle_students(cfg: DictConfig, data: ImageData, few_step: bool) -> list[tuple[int, Any, dict[str, Any]]]:
    """(sampling steps, net, metadata) of the students to publish, the bundle's default last: the stage-one
    student (the phase-two one with ``negative_phase.enabled``), then (``few_step``) every progressive round, each checked to descend from it."""
    net, meta = load_student(cfg, data, serving_student_path(cfg))
    check_one_head(net, "task=publish")
    stage = "distill + negative_phase" if meta.get("stage") == "negative_phase" else "distill"
    students = [(int(cfg.sampler.num_steps), net, dict(meta, stage=stage))]
    if few_step:
        for n, path in verified_rounds(cfg, data):
            net, meta = load_student(cfg, data, path)
            students.append((n, net, dict(meta, stage=f"progressive round {meta.get('round')}")))
    return students


def publish_provenance(cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """What the bundle is made of: its settings, the teacher (its card), the students it holds and the
    evaluation report its card shows."""
    inputs = {"teacher": provenance.file_digest(teacher_checkpoint_path(cfg)),
              "student": provenance.file_digest(serving_student_path(cfg)),
              "evaluation": provenance.file_digest(build.run_dir(cfg) / "evaluate" / "report.json")}
    if bool(cfg.publish.few_step):
        inputs.update({f"student_{n}step": provenance.file_digest(path) for n, path in verified_rounds(cfg, data)})
    return provenance.record(cfg, "publish", inputs)


def run_publish(cfg: DictConfig, replace: bool = False) -> Path:
    """Write the bundle; an existing one is replaced (atomically) only with ``publish.overwrite=true`` or
    ``replace`` (the pipeline, for the run's own bundle when it is out of date)."""
    from student.card import model_card

    p = cfg.publish
    dest, overwrite = bundle_dir(cfg), bool(p.overwrite) or replace
    if dest.exists() and not overwrite:
        raise UserError(f"bundle {dest} already exists (set publish.overwrite=true to replace it)")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder")
    if int(p.mindir_batch) < 1:
        raise UserError(f"publish.mindir_batch={p.mindir_batch} must be >= 1")
    data = load_data(cfg.data)
    students = bundle_students(cfg, data, bool(p.few_step))
    default_steps, net, meta = students[-1]
    stages = [(n, m.get("stage", "distill")) for n, _, m in students]
    config = bundle_config(cfg, net, meta, int(p.mindir_batch), stages, students[0][2],
                           {n: student.config.to_dict() for n, student, _ in students},
                           {n: input_interval(m) for n, _, m in students})
    config["provenance"] = publish_provenance(cfg, data)
    card_ws = [float(w) for w in p.card_ws]
    lo, hi = config["guidance"]["w_min"], config["guidance"]["w_max"]
    if not card_ws or any(not lo <= w <= hi for w in card_ws):
        raise UserError(f"publish.card_ws {card_ws} must be a non-empty list inside the student's range [{lo:g}, {hi:g}]")
    with staged_folder(dest, overwrite) as tmp:
        for n, student, _ in students:
            save_weights(student, tmp / variant_weights(n, n == default_steps))
        (tmp / CONFIG).write_text(json_text(config))
        model = Pretrained(build_net(config, tmp / WEIGHTS), config, tmp)  # the card's samples come from the files
        export_mindir(model.net, tmp / MINDIR, int(p.mindir_batch))
        if config["mindir_sampler"]:
            export_sampler_mindir(model, tmp / config["mindir_sampler"]["file"])
        write_sample_grid(model, tmp / GRID, card_ws)
        negative = negative_model(model, tmp)
        if negative is not None:
            write_negative_grid(negative, tmp / NEGATIVE_GRID, float(config["sampler"]["w"]))
        (tmp / CARD).write_text(model_card(config, read_report(cfg), card_ws))
        write_manifest(tmp)
    sizes = {f.name: f.stat().st_size for f in sorted(dest.iterdir())}
    log.info("publish: wrote %s (%s)", dest, ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    return dest


def negative_model(model: Pretrained, folder: Path) -> Pretrained | None:
    """The bundle's student that takes negative classes: the default one, or the variant that does (the
    phase-two student beside progressive rounds without the input); None if none does."""
    if model.takes_negative:
        return model
    names = model.config["guidance"].get("negative_variants") or []
    if not names:
        return None
    weights, config = variant_config(model.config, names[0], {p.name for p in folder.iterdir()})
    return Pretrained(build_net(config, folder / weights), config, folder)
