"""Training progress for people: a tqdm bar on a terminal, else a log line every ``log_every`` steps,
and the mean loss and speed as TensorBoard scalars."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Reports a run of ``kind`` (teacher, student, ...) from ``start`` to ``total`` steps.

    Only the main rank shows anything (``show``); ``writer`` is a tensorboardX SummaryWriter or None.
    """

    def __init__(self, kind: str, start: int, total: int, log_every: int, writer: Any = None,
                 show: bool = True) -> None:
        self.kind, self.total, self.log_every, self.writer, self.show = kind, total, log_every, writer, show
        self.bar = tqdm(total=total, initial=start, desc=kind, unit="step", mininterval=2.0, dynamic_ncols=True,
                        disable=not (show and sys.stderr.isatty()))  # else (logs, msrun workers) log lines
        self._t_last, self._step_last = time.perf_counter(), start

    def step_done(self, step: int, losses: list[float]) -> None:
        """After ``step`` steps: advance the bar, and at each ``log_every`` (and the last step) report."""
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            self._report(step, losses)

    def _report(self, step: int, losses: list[float]) -> None:
        now = time.perf_counter()
        rate = (step - self._step_last) / max(now - self._t_last, 1e-9)
        recent = float(np.mean(losses[-self.log_every:]))
        self.bar.set_postfix(loss=f"{recent:.4g}", steps_per_s=f"{rate:.2f}")
        if self.bar.disable and self.show:
            log.info("%s: step %d/%d loss %.4g (%.2f steps/s)", self.kind, step, self.total, recent, rate)
        if self.writer is not None:
            self.writer.add_scalar(f"{self.kind}/loss", recent, step)
            self.writer.add_scalar(f"{self.kind}/steps_per_s", rate, step)
        self._t_last, self._step_last = time.perf_counter(), step

    def close(self) -> None:
        self.bar.close()
