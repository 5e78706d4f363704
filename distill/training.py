"""One training loop for the teacher, the student and progressive rounds.

What differs between them is only the loss: a function ``loss_fn(net, *batch) -> loss``
and a host-side ``batch_factory(start_step)`` that returns ``make_batch(step) -> tuple of
numpy arrays``. All randomness of a step
(data order, t, noise, w, condition dropout) is drawn on the host from
``np.random.default_rng((seed, step))``, so a resumed run replays exactly the stream an
uninterrupted run would have seen.

The loop owns: a jitted step (value_and_grad + clipping + AdamW), EMA weights, atomic
checkpoints with optimizer state and step (resume on restart), TensorBoard scalars, a
progress bar, and a stop with a clear error on a non-finite loss.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from tqdm import tqdm

from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.errors import UserError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 25
    checkpoint_every: int = 200
    seed: int = 0
    use_jit: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"training: steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"training: ema_decay {self.ema_decay} must be in [0, 1)")
        if self.lr <= 0:
            raise UserError(f"training: lr {self.lr} must be > 0")


class EMAUpdate(nn.Cell):
    """ema <- decay * ema + (1 - decay) * net, for every trainable parameter (graph friendly)."""

    def __init__(self, ema: nn.Cell, net: nn.Cell) -> None:
        super().__init__()
        self.ema = ema  # attributes give the two copies distinct parameter names
        self.net = net
        self.ema_params = ms.ParameterTuple(ema.trainable_params())
        self.net_params = ms.ParameterTuple(net.trainable_params())
        self.map = ops.HyperMap()

    def construct(self, decay: ms.Tensor):
        return self.map(ops.partial(_ema_assign, decay), self.ema_params, self.net_params)


def _ema_assign(decay, e, p):
    return ops.assign(e, e * decay + p * (1.0 - decay))


def net_state(net: nn.Cell) -> dict[str, np.ndarray]:
    """Trainable parameters by their name inside ``net`` (prefix-free)."""
    return {name: p.asnumpy() for name, p in _named_params(net).items()}


def load_net_state(net: nn.Cell, state: dict[str, np.ndarray], source: str, strict: bool = True) -> list[str]:
    """Copy ``state`` into ``net``; a missing or mis-shaped tensor is a UserError naming ``source``.

    With ``strict=False`` parameters absent from ``state`` keep their values and their
    names are returned (the student's guidance embedding, when loading a teacher).
    """
    params = _named_params(net)
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    bad_shape = [k for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    if bad_shape or unexpected or (strict and missing):
        detail = (f"shape mismatch for {bad_shape[:3]}" if bad_shape else
                  f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}")
        raise UserError(f"{source} does not match the model architecture ({detail})")
    for k, p in params.items():
        if k in state:
            p.set_data(ms.Tensor(state[k].astype(np.float32)))
    return missing


def _named_params(net: nn.Cell) -> dict[str, ms.Parameter]:
    # Names relative to ``net``: Parameter.name may carry an outer cell's prefix.
    return {name: p for name, p in net.parameters_and_names() if p.requires_grad}


def copy_weights(src: nn.Cell, dst: nn.Cell) -> None:
    load_net_state(dst, net_state(src), "source network", strict=False)


class Trainer:
    """Trains ``net`` (keeping an EMA copy ``ema``) on ``loss_fn`` in ``out_dir``."""

    def __init__(
        self,
        net: nn.Cell,
        ema: nn.Cell,
        loss_fn: Callable[..., ms.Tensor],
        batch_factory: Callable[[int], Callable[[int], tuple[np.ndarray, ...]]],
        settings: TrainSettings,
        out_dir: Path,
        meta: dict[str, Any],
        writer: Any = None,
        on_checkpoint: Optional[Callable[[int], None]] = None,
    ) -> None:
        settings.validate()
        self.net, self.ema, self.settings = net, ema, settings
        self.batch_factory = batch_factory  # start_step -> (step -> host batch)
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.writer = writer
        self.on_checkpoint = on_checkpoint
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.ema_update = EMAUpdate(ema, net)
        self.lr = ms.Parameter(ms.Tensor(settings.lr, ms.float32), name="lr", requires_grad=False)
        self.optimizer = nn.AdamWeightDecay(net.trainable_params(), self.lr, weight_decay=settings.weight_decay)
        def forward(*batch):
            return loss_fn(net, *batch)

        grad_fn = ms.value_and_grad(forward, None, self.optimizer.parameters)
        clip = settings.grad_clip

        def train_step(*batch):
            loss, grads = grad_fn(*batch)
            if clip > 0:
                grads = ops.clip_by_global_norm(grads, clip)
            self.optimizer(grads)
            return loss

        def ema_step(decay):
            return self.ema_update(decay)

        self._train_step = ms.jit(train_step) if settings.use_jit else train_step
        self._ema_step = ms.jit(ema_step) if settings.use_jit else ema_step
        self.step = 0
        self.losses: list[float] = []

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        tensors = {f"net.{k}": v for k, v in net_state(self.net).items()}
        tensors.update({f"ema.{k}": v for k, v in net_state(self.ema).items()})
        for name, p in self.optimizer.parameters_and_names():
            if name.startswith(("adam_m.", "adam_v.")) or name == "global_step":
                tensors[f"opt.{name}"] = p.asnumpy()
        tensors["losses"] = np.asarray(self.losses, np.float32)
        return tensors

    def save(self) -> None:
        meta = dict(self.meta, step=self.step, total_steps=self.settings.steps)
        save_checkpoint(self.ckpt_path, self.state(), meta)

    def try_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        tensors, meta = load_checkpoint(self.ckpt_path)
        for key in ("kind", "model"):
            if key in self.meta and meta.get(key) != self.meta[key]:
                raise UserError(
                    f"{self.ckpt_path} holds a different run ({key}: {meta.get(key)} vs {self.meta[key]}); "
                    f"use another output dir or remove it"
                )
        load_net_state(self.net, _strip(tensors, "net."), str(self.ckpt_path))
        load_net_state(self.ema, _strip(tensors, "ema."), str(self.ckpt_path))
        for name, p in self.optimizer.parameters_and_names():
            if f"opt.{name}" in tensors:
                p.set_data(ms.Tensor(tensors[f"opt.{name}"]))
        self.step = int(meta.get("step", 0))
        self.losses = [float(x) for x in tensors.get("losses", np.zeros(0))]
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)
        return True

    # -- the loop ----------------------------------------------------------------------
    def _lr_at(self, step: int) -> float:
        s = self.settings
        return s.lr * min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else s.lr

    def run(self) -> list[float]:
        s = self.settings
        if self.step == 0:
            copy_weights(self.net, self.ema)
        if self.step >= s.steps:
            log.info("training already complete (%d steps) in %s", self.step, self.out_dir)
            return self.losses
        bar = tqdm(total=s.steps, initial=self.step, desc=self.meta.get("kind", "train"),
                   unit="step", mininterval=2.0, dynamic_ncols=True)
        make_batch = self.batch_factory(self.step)
        t_last, steps_last = time.perf_counter(), self.step
        decay = ms.Tensor(s.ema_decay, ms.float32)
        while self.step < s.steps:
            batch = tuple(ms.Tensor(a) for a in make_batch(self.step))
            self.lr.set_data(ms.Tensor(self._lr_at(self.step), ms.float32))
            loss = float(self._train_step(*batch).asnumpy())
            if not math.isfinite(loss):
                bar.close()
                kept = f"; last good checkpoint kept at {self.ckpt_path}" if self.ckpt_path.exists() else ""
                raise UserError(f"training: loss became non-finite ({loss}) at step {self.step}{kept}")
            self._ema_step(decay)
            self.losses.append(loss)
            self.step += 1
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == s.steps:
                now = time.perf_counter()
                rate = (self.step - steps_last) / max(now - t_last, 1e-9)
                t_last, steps_last = now, self.step
                recent = float(np.mean(self.losses[-s.log_every:]))
                bar.set_postfix(loss=f"{recent:.4f}", steps_per_s=f"{rate:.2f}")
                if self.writer is not None:
                    self.writer.add_scalar(f"{self.meta.get('kind', 'train')}/loss", recent, self.step)
                    self.writer.add_scalar(f"{self.meta.get('kind', 'train')}/steps_per_s", rate, self.step)
            if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                self.save()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(self.step)
        bar.close()
        return self.losses


def _strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_ema_weights(path: Path, net: nn.Cell, strict: bool = True) -> dict[str, Any]:
    """Load the EMA weights of a training checkpoint into ``net``; returns its metadata."""
    tensors, meta = load_checkpoint(path)
    ema = _strip(tensors, "ema.")
    if not ema:
        raise UserError(f"{path} has no EMA weights: not a training checkpoint of this project")
    load_net_state(net, ema, f"checkpoint {path}", strict=strict)
    return meta
