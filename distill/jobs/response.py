"""``task=response``: the student's effective w and relative error per sampling time."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.core import build
from distill.core import diffusion as dm
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import write_json, write_text
from distill.core.sampling import jit_predictor
from distill.jobs.common import check_w
from student.distill import distill_target, input_interval
from student.loading import load_student
from student.model import check_one_head
from student.response import guidance_response, response_markdown
from teacher.guidance import ConditionalPrediction, GuidanceBranches
from teacher.loading import load_teacher
from teacher.unet import UNet

log = logging.getLogger(__name__)


def _student(cfg: DictConfig, data: ImageData) -> tuple[UNet, dict[str, Any]]:
    path = cfg.response.student
    net, meta = load_student(cfg, data, Path(str(path)) if path else None)
    check_one_head(net, "task=response")
    return net, meta


def run_response(cfg: DictConfig) -> dict[str, Any]:
    r = cfg.response
    ws = [check_w(float(w)) for w in r.ws]
    n = r.num_images
    if not ws or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"response: needs at least one w and an integer num_images >= 1 (got ws={ws}, "
                        f"num_images={n!r})")
    data = load_data(cfg.data)
    x, y = data.test_images[:n], data.test_labels[:n]
    teacher = jit_predictor(GuidanceBranches(load_teacher(cfg, data)), bool(cfg.jit))
    net, meta = _student(cfg, data)
    student = jit_predictor(ConditionalPrediction(net), bool(cfg.jit))
    intervals = distill_target(meta)[1], input_interval(meta)  # the target's and the w input's
    times = dm.sampling_times(int(cfg.sampler.num_steps))[:-1]  # the times a sampler evaluates the network at
    rows = guidance_response(teacher, student, x, y, data.num_classes, times, ws, cfg.diffusion.schedule,
                             cfg.diffusion.prediction, int(cfg.seed), *intervals)
    out = build.run_dir(cfg) / "response"
    report = {"num_images": int(len(x)), "ws": ws,
              "target_interval": list(intervals[0]) if intervals[0] else None,
              "w_input_interval": list(intervals[1]) if intervals[1] else None, "rows": [
        {"t": row["t"], "effective_w": {str(w): v for w, v in row["effective_w"].items()},
         "relative_error": {str(w): v for w, v in row["relative_error"].items()}} for row in rows]}
    write_json(out / "response.json", report)
    write_text(out / "response.md", response_markdown(rows, ws, len(x), *intervals))
    log.info("response: report in %s", out)
    return report
