"""What every training job shares around :class:`distill.core.training.Trainer`: rank 0's TensorBoard
writer, resuming the checkpoint in the job's folder, and after training ``train_summary.json`` and one
log line."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from mindspore import nn
from omegaconf import DictConfig

from distill.core import build
from distill.core.fileio import write_json
from distill.core.provenance import Restart
from distill.core.runtime import is_main
from distill.core.training import TrainSettings, Trainer

log = logging.getLogger(__name__)


def resumed_trainer(cfg: DictConfig, net: nn.Cell, ema: nn.Cell, loss_fn: Callable[..., Any],
                    batches: Callable[[int], Callable[[int], tuple[np.ndarray, ...]]], settings: TrainSettings,
                    out: Path, meta: dict[str, Any], restart: Restart, tb_name: str = "",
                    only: Optional[Callable[[str], bool]] = None) -> Trainer:
    """A :class:`Trainer` of ``net`` in ``out``, writing TensorBoard scalars to ``<run>/tb[/tb_name]`` on rank 0
    (``trainer.writer``; None on the other ranks), resumed from ``out``'s checkpoint when that was made with
    this run's settings and inputs (``restart``: what to do otherwise, :func:`distill.core.build.restart`)."""
    from tensorboardX import SummaryWriter

    tb = build.run_dir(cfg) / "tb"
    writer = SummaryWriter(str(tb / tb_name if tb_name else tb)) if is_main() else None
    trainer = Trainer(net, ema, loss_fn, batches, settings, out, meta, writer, only=only)
    trainer.try_resume(restart)
    return trainer


def run_and_summarise(trainer: Trainer, name: str, keep_writer: bool = False, **extra: Any) -> dict[str, Any]:
    """Run ``trainer`` and close its writer (unless ``keep_writer``: the job writes more). When it trained, write
    ``train_summary.json`` in its folder on rank 0 (steps, seconds, the mean loss of the first and last 20 steps,
    ``extra``), log one line and return the summary; {} when the checkpoint was already complete."""
    start_step, t0 = trainer.step, time.perf_counter()
    losses = trainer.run()
    seconds = time.perf_counter() - t0
    if trainer.writer is not None and not keep_writer:
        trainer.writer.close()
    ran = trainer.step - start_step
    if ran == 0:
        return {}
    summary = {"provenance": trainer.meta.get("provenance"), "steps": trainer.step, "trained_steps": ran,
               "seconds": round(seconds, 1), "seconds_per_step": round(seconds / ran, 4),
               "first_loss": float(np.mean(losses[:20])), "last_loss": float(np.mean(losses[-20:])), **extra}
    if is_main():
        write_json(trainer.out_dir / "train_summary.json", summary)
    log.info("%s: %d steps in %.1f s (%.3f s/step), loss %.4g -> %.4g", name, ran, seconds, seconds / ran,
             summary["first_loss"], summary["last_loss"])
    return summary
