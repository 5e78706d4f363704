"""``task=publish``: the student as a self-contained bundle (built aside, renamed into place when complete)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from distill.core.errors import UserError
from distill.core.fileio import staged_folder
from student.bundle import CARD, CONFIG, GRID, MINDIR, WEIGHTS, Pretrained, build_net, save_weights, write_manifest
from student.publish import (bundle_config, bundle_dir, export_mindir, export_sampler_mindir, read_report,
                             write_sample_grid)

log = logging.getLogger(__name__)


def run_publish(cfg: DictConfig) -> Path:
    from distill.core.data import load_data
    from student.card import model_card
    from student.loading import load_student

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
        if config["mindir_sampler"]:
            export_sampler_mindir(model, tmp / config["mindir_sampler"]["file"])
        write_sample_grid(model, tmp / GRID, card_ws)
        (tmp / CARD).write_text(model_card(config, read_report(cfg), card_ws))
        write_manifest(tmp)
    sizes = {f.name: f.stat().st_size for f in sorted(dest.iterdir())}
    log.info("publish: wrote %s (%s)", dest, ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    return dest
