"""The resumable state of a training run in one checkpoint file: the weights, the EMA weights, the
optimizer's moments and step, the fp16 loss scale and the losses so far (plus metadata).

Written atomically by rank 0; on restart the same file brings every rank back to the same step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import mindspore as ms
from mindspore import amp, nn

from distill.core.checkpoint import load_checkpoint, save_checkpoint
from distill.core.errors import UserError
from distill.core.weights import load_net_state, net_state, non_finite, strip_prefix

log = logging.getLogger(__name__)


class TrainingCheckpoint:
    """Saves and restores ``net``, ``ema``, ``optimizer`` (and ``scaler``) at ``path``.

    ``meta`` describes the run; on resume its ``kind`` and ``model`` must match the file's, so a
    run never continues from another model's checkpoint.
    """

    def __init__(self, path: Path, meta: dict[str, Any], net: nn.Cell, ema: nn.Cell, optimizer: nn.Optimizer,
                 scaler: Optional[amp.DynamicLossScaler]) -> None:
        self.path, self.meta = Path(path), meta
        self.net, self.ema, self.optimizer, self.scaler = net, ema, optimizer, scaler

    def tensors(self, losses: list[float]) -> dict[str, np.ndarray]:
        tensors = {f"net.{k}": v for k, v in net_state(self.net).items()}
        tensors.update({f"ema.{k}": v for k, v in net_state(self.ema).items()})
        for name, p in self.optimizer.parameters_and_names():
            if name.startswith(("adam_m.", "adam_v.")) or name == "global_step":
                tensors[f"opt.{name}"] = p.asnumpy()
        if self.scaler is not None:
            tensors["amp.scale_value"] = self.scaler.scale_value.asnumpy()
            tensors["amp.counter"] = self.scaler.counter.asnumpy()
        tensors["losses"] = np.asarray(losses, np.float32)
        return tensors

    def save(self, step: int, losses: list[float], **meta: Any) -> None:
        """Write the checkpoint of ``step`` atomically; ``meta`` adds to the run's metadata.

        Weights that are no longer finite are refused, so the last good checkpoint stays in place."""
        tensors = self.tensors(losses)
        bad = non_finite({k: v for k, v in tensors.items() if k.startswith(("net.", "ema."))})
        if bad:
            kept = f"; last good checkpoint kept at {self.path}" if self.path.exists() else ""
            raise UserError(f"training: weights became non-finite ({bad[0]!r}) at step {step}; try a lower lr "
                            f"or check the data{kept}")
        save_checkpoint(self.path, tensors, dict(self.meta, step=step, **meta))

    def resume(self, remove_stale: bool = True) -> Optional[tuple[int, list[float]]]:
        """Load the checkpoint if there is one: (step, losses), else None.

        ``remove_stale`` first deletes temp files an interrupted write left beside it (rank 0 only).
        """
        if remove_stale:
            remove_stale_temp_files(self.path)
        if not self.path.exists():
            return None
        tensors, meta = load_checkpoint(self.path)
        for key in ("kind", "model"):
            if key in self.meta and meta.get(key) != self.meta[key]:
                diff = _difference(key, meta.get(key), self.meta[key])
                raise UserError(f"{self.path} holds a different run ({diff}; checkpoint vs now); "
                                "use another output dir or remove it")
        load_net_state(self.net, strip_prefix(tensors, "net."), str(self.path))
        load_net_state(self.ema, strip_prefix(tensors, "ema."), str(self.path))
        for name, p in self.optimizer.parameters_and_names():
            if f"opt.{name}" in tensors:
                p.set_data(ms.Tensor(tensors[f"opt.{name}"]))
        if self.scaler is not None and "amp.scale_value" in tensors:
            self.scaler.scale_value.set_data(ms.Tensor(tensors["amp.scale_value"]))
            self.scaler.counter.set_data(ms.Tensor(tensors["amp.counter"]))
        step = int(meta.get("step", 0))
        log.info("resumed from %s at step %d", self.path, step)
        return step, [float(x) for x in tensors.get("losses", np.zeros(0))]


def _difference(key: str, old: Any, new: Any) -> str:
    """``model: channels 8 vs 16`` -- only the entries that differ, for a one-line message."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return f"{key}: " + ", ".join(f"{k} {old.get(k)} vs {new.get(k)}" for k in keys)
    return f"{key}: {old} vs {new}"


def remove_stale_temp_files(path: Path) -> None:
    """Temp files an interrupted atomic write left beside ``path`` (a kill -9 mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s left by an interrupted checkpoint write", tmp)
