"""One training loop for the teacher, the student and progressive rounds.

What differs between them is only the loss: a function ``loss_fn(net, *batch) -> loss``
and a host-side ``batch_factory(start_step)`` that returns ``make_batch(step) -> tuple of
numpy arrays``. All randomness of a step
(data order, t, noise, w, condition dropout) is drawn on the host from
``np.random.default_rng((seed, step))``, so a resumed run replays exactly the stream an
uninterrupted run would have seen.

This module holds the settings, the learning-rate schedule, the optimizer, the jitted step
(value_and_grad + clipping + AdamW), the EMA update and :class:`Trainer`, the loop itself, which
stops with a clear error on a non-finite loss. The checkpoint (weights, EMA, optimizer state, step;
resume on restart) is :class:`distill.core.trainstate.TrainingCheckpoint`; the progress bar, log
lines and TensorBoard scalars are :class:`distill.core.progress.Progress`.

Precision (``TrainSettings.precision``, default: the runtime's ``precision``): ``fp32``;
``fp16`` = ``amp.auto_mixed_precision(net, "O2")`` with a ``DynamicLossScaler``, a step whose
gradients are not all finite is skipped (weights, optimizer and EMA unchanged) and the scale
shrinks; ``bf16`` (Ascend) = O2 in bfloat16 without loss scaling. The EMA copy stays fp32.

Data parallel (the runtime's ``distributed``): every rank draws the same global batch and keeps
its slice, gradients are averaged over ranks by ``nn.DistributedGradReducer`` inside the jitted
step and the loss by an all-reduce, so every rank takes the same step a single process would on
the global batch. Only rank 0 writes checkpoints, TensorBoard scalars and the progress bar.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import mindspore as ms
from mindspore import amp, nn, ops
from distill.core import provenance, runtime
from distill.core.checkpoint import CHECKPOINT_NAME, read_meta
from distill.core.errors import UserError
from distill.core.progress import Progress
from distill.core.trainstate import TrainingCheckpoint, remove_stale_temp_files
from distill.core.weights import copy_weights, named_params, weights_digest

log = logging.getLogger(__name__)
__all__ = ["CHECKPOINT_NAME", "LR_DECAYS", "TrainSettings", "Trainer", "learning_rate", "lr_groups",
           "make_optimizer", "trained_params"]
MAX_SKIPPED_STEPS = 50  # fp16: this many overflowing steps in a row means the run has diverged


LR_DECAYS = ("constant", "cosine")


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "constant") -> float:
    """The learning rate of 0-based ``step``: linear warm-up, then constant or a cosine decay towards 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "cosine":
        span = max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    return base_lr


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "constant"           # constant | cosine (to 0 at the last step, after the warm-up)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 25
    checkpoint_every: int = 200
    seed: int = 0
    use_jit: bool = True
    precision: Optional[str] = None      # fp32 | fp16 | bf16; None = the runtime's (config key `precision`)
    loss_scale: float = 2.0 ** 16        # fp16: initial dynamic loss scale
    loss_scale_window: int = 1000        # fp16: finite steps before the scale doubles
    param_lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr factor

    def validate(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "log_every", "checkpoint_every", "seed",
                     "loss_scale_window"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise UserError(f"training: {name} must be an integer, not {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "loss_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                raise UserError(f"training: {name} must be a number, not {value!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(f"training: warmup_steps ({self.warmup_steps}), weight_decay ({self.weight_decay}) "
                            f"and grad_clip ({self.grad_clip}) must be >= 0")
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"training: steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"training: ema_decay {self.ema_decay} must be in [0, 1)")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"training: lr {self.lr} must be a finite number > 0")
        if self.lr_decay not in LR_DECAYS:
            raise UserError(f"training: lr_decay {self.lr_decay!r} must be one of {', '.join(LR_DECAYS)}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise UserError(f"training: log_every ({self.log_every}) and checkpoint_every "
                            f"({self.checkpoint_every}) must be >= 1")
        for prefix, scale in dict(self.param_lr_scale).items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) \
                    or not (math.isfinite(scale) and scale > 0):
                raise UserError(f"training: param_lr_scale[{prefix!r}] must be a finite number > 0, not {scale!r}")
        if self.loss_scale < 1 or self.loss_scale_window < 1:
            raise UserError(f"training: loss_scale ({self.loss_scale}) and loss_scale_window "
                            f"({self.loss_scale_window}) must be >= 1")


def lr_groups(names: list[str], param_lr_scale: Mapping[str, float]) -> list[float]:
    """The lr factor of each parameter: that of the first prefix of ``param_lr_scale`` its name
    starts with, else 1."""
    return [next((float(f) for p, f in param_lr_scale.items() if name.startswith(p)), 1.0) for name in names]


def trained_params(net: nn.Cell, only: Optional[Callable[[str], bool]] = None) -> dict[str, ms.Parameter]:
    """The parameters a run trains, by their name inside ``net``: all trainable ones, or those whose name
    ``only`` accepts (the others stay exactly as they are: no optimizer update, no EMA update)."""
    named = named_params(net)  # names inside net: Parameter.name gains prefixes once net sits in other cells
    if only is None:
        return named
    chosen = {name: p for name, p in named.items() if only(name)}
    if not chosen:
        raise UserError("training: no parameter of the model is selected for training")
    return chosen


def make_optimizer(net: nn.Cell, settings: TrainSettings, only: Optional[Callable[[str], bool]] = None
                   ) -> tuple[nn.Optimizer, list[tuple[ms.Parameter, float]]]:
    """AdamW over ``net``'s trainable parameters (those ``only`` accepts, :func:`trained_params`), one lr
    group per distinct factor of ``settings.param_lr_scale``; also the optimizer's lr Parameters with their
    factors (the train step assigns ``lr * factor`` to each)."""
    named = trained_params(net, only)
    names, params = list(named), list(named.values())
    factors = lr_groups(names, settings.param_lr_scale)
    for prefix, factor in settings.param_lr_scale.items():
        count = sum(name.startswith(prefix) for name in names)
        if count == 0:
            raise UserError(f"training: param_lr_scale prefix {prefix!r} matches no parameter of the model")
        if float(factor) != 1.0:
            log.info("lr x %g for the %d parameter tensors under %r", float(factor), count, prefix)
    lr, wd = float(settings.lr), settings.weight_decay
    if all(f == 1.0 for f in factors):
        opt = nn.AdamWeightDecay(params, lr, weight_decay=wd)
        return opt, [(opt.learning_rate, 1.0)]
    distinct = sorted(set(factors))
    groups = [{"params": [p for p, f in zip(params, factors) if f == g], "lr": lr * g} for g in distinct]
    opt = nn.AdamWeightDecay(groups + [{"order_params": params}], lr, weight_decay=wd)
    # the optimizer gives all parameters of a group one shared lr Parameter
    lr_of = {id(p): lr_param for p, lr_param in zip(opt.group_params, opt.group_lr)}
    return opt, [(lr_of[id(group["params"][0])], g) for group, g in zip(groups, distinct)]


class EMAUpdate(nn.Cell):
    """ema <- decay * ema + (1 - decay) * net, for every trained parameter (graph friendly); the others
    are left alone (decay * p + (1 - decay) * p need not round to p)."""

    def __init__(self, ema: nn.Cell, net: nn.Cell, only: Optional[Callable[[str], bool]] = None) -> None:
        super().__init__()
        self.ema = ema  # attributes give the two copies distinct parameter names
        self.net = net
        trained = trained_params(net, only)
        ema_named = named_params(ema)
        self.ema_params = ms.ParameterTuple([ema_named[name] for name in trained])
        self.net_params = ms.ParameterTuple(list(trained.values()))
        self.map = ops.HyperMap()

    def construct(self, decay: ms.Tensor):
        return self.map(ops.partial(_ema_assign, decay), self.ema_params, self.net_params)


def _ema_assign(decay, e, p):
    return ops.assign(e, e * decay + p * (1.0 - decay))


def build_train_step(train_net: nn.Cell, loss_fn: Callable[..., ms.Tensor], optimizer: nn.Optimizer,
                     lr_params: list[tuple[ms.Parameter, float]], scaler: Optional[amp.DynamicLossScaler],
                     grad_clip: float, world: int, use_jit: bool) -> Callable[..., Any]:
    """The train step ``(lr, *local batch) -> (global-mean loss, grads finite)``; it updates the weights.

    The learning rate is an input, assigned to the optimizer's own lr Parameters inside the step:
    ``set_data`` on a Parameter from the host between jitted calls was not seen by the compiled
    graph (the schedule silently stayed at the base lr). With ``world`` > 1 the gradients are
    averaged over the data-parallel ranks; with a ``scaler`` (fp16) a step whose gradients are not
    all finite changes nothing but the loss scale.
    """
    def set_lr(lr):
        for param, scale in lr_params:
            ops.assign(param, lr * scale)
    if world > 1:
        reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world)
        all_reduce = ops.AllReduce()

        def reduce_grads(grads):
            return reducer(grads)

        def mean_loss(loss):
            return all_reduce(loss) / world
    else:
        def reduce_grads(grads):
            return grads

        def mean_loss(loss):
            return loss

    if grad_clip > 0:
        def clipped(grads):
            return ops.clip_by_global_norm(grads, grad_clip)
    else:
        def clipped(grads):
            return grads

    if scaler is None:
        def forward(*batch):
            return loss_fn(train_net, *batch)

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

        def train_step(lr, *batch):
            set_lr(lr)
            loss, grads = grad_fn(*batch)
            grads = reduce_grads(grads)
            optimizer(clipped(grads))
            return mean_loss(loss), ops.ones((), ms.bool_)
    else:
        def scaled_forward(*batch):
            return scaler.scale(loss_fn(train_net, *batch))

        grad_fn = ms.value_and_grad(scaled_forward, None, optimizer.parameters)

        def train_step(lr, *batch):
            set_lr(lr)
            scaled_loss, grads = grad_fn(*batch)
            loss = scaler.unscale(scaled_loss)
            grads = scaler.unscale(reduce_grads(grads))
            finite = amp.all_finite(grads)  # the same on every rank: grads are already reduced
            if finite:
                optimizer(clipped(grads))
            scaler.adjust(finite)
            return mean_loss(loss), finite

    return runtime.jit(train_step) if use_jit else train_step


class Trainer:
    """Trains ``net`` (keeping an EMA copy ``ema``) on ``loss_fn`` in ``out_dir``.

    Under fp16/bf16 ``net`` itself is cast for training (``auto_mixed_precision`` works in place);
    sample from ``ema``, which stays fp32. ``only``: a test on parameter names, to train those alone
    (:func:`trained_params`; the checkpoint still holds every weight).
    """

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
        only: Optional[Callable[[str], bool]] = None,
    ) -> None:
        settings.validate()
        rt = runtime.current()
        self.rt = rt
        self.precision = runtime.check_precision(settings.precision or rt.precision, rt.device)
        runtime.local_batch_size(settings.batch_size)  # the global batch must split evenly over the ranks
        self.net, self.ema, self.settings = net, ema, settings
        self.batch_factory = batch_factory  # start_step -> (step -> host batch of the global batch size)
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.writer = writer if rt.is_main else None
        self.on_checkpoint = on_checkpoint
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        ema_update = EMAUpdate(ema, net, only)
        self.optimizer, lr_params = make_optimizer(net, settings, only)
        self.scaler: Optional[amp.DynamicLossScaler] = None
        train_net = net
        if self.precision in ("fp16", "bf16"):
            dtype = ms.float16 if self.precision == "fp16" else ms.bfloat16
            train_net = amp.auto_mixed_precision(net, "O2", dtype=dtype)  # output cast back to fp32
        if self.precision == "fp16":
            self.scaler = amp.DynamicLossScaler(settings.loss_scale, 2, settings.loss_scale_window)
        self.checkpoint = TrainingCheckpoint(self.ckpt_path, meta, net, ema, self.optimizer, self.scaler)
        self._train_step = build_train_step(train_net, loss_fn, self.optimizer, lr_params, self.scaler,
                                            settings.grad_clip, rt.world_size, settings.use_jit)
        jit = runtime.jit if settings.use_jit else (lambda f: f)

        def ema_step(decay):
            return ema_update(decay)

        self._ema_step = jit(ema_step)
        self.step = 0
        self.losses: list[float] = []
        self.skipped_steps = 0
        self._skipped_in_a_row = 0

    # -- checkpoints: TrainingCheckpoint does the work -----------------------------------
    def save(self) -> None:
        """Write the checkpoint atomically (rank 0 only; the other ranks hold the same weights)."""
        if self.rt.is_main:
            self.checkpoint.save(self.step, self.losses, total_steps=self.settings.steps, precision=self.precision,
                                 data_parallel_workers=self.rt.world_size)

    def try_resume(self, restart: provenance.Restart = provenance.Restart()) -> bool:
        """Resume from the checkpoint if it was made with this run's provenance (``meta["provenance"]``);
        one made otherwise is refused with the keys that differ, or (``restart``) trained again from step 0."""
        if self.ckpt_path.is_file() and "provenance" in self.meta and not provenance.may_resume(
                self.ckpt_path, read_meta(self.ckpt_path), self.meta["provenance"], self.settings.steps, restart):
            log.info("%s was made with other settings or inputs: training again from step 0", self.ckpt_path)
            if self.rt.is_main:
                remove_stale_temp_files(self.ckpt_path)
            return False
        resumed = self.checkpoint.resume(remove_stale=self.rt.is_main)
        if resumed is None:
            return False
        self.step, self.losses = resumed
        return True

    # -- the loop ----------------------------------------------------------------------
    def _lr_at(self, step: int) -> float:
        s = self.settings
        return learning_rate(step, s.lr, s.steps, s.warmup_steps, s.lr_decay)

    def _start_from_rank0_weights(self) -> None:
        """Give every rank rank 0's weights (they differ when earlier work drew from MindSpore's RNG
        on rank 0 only, e.g. the teacher check before a student's random guidance layers in a pipeline)."""
        params = self.net.trainable_params()
        for p, value in zip(params, runtime.broadcast_from_main([p.asnumpy() for p in params])):
            p.set_data(ms.Tensor(value))

    def run(self) -> list[float]:
        s = self.settings
        kind = self.meta.get("kind", "train")
        if self.rt.world_size > 1:
            self._start_from_rank0_weights()
        if self.step == 0:
            copy_weights(self.net, self.ema)
        if self.step >= s.steps:
            log.info("training already complete (%d steps) in %s", self.step, self.out_dir)
            return self.losses
        progress = Progress(kind, self.step, s.steps, s.log_every, self.writer, show=self.rt.is_main)
        make_batch = self.batch_factory(self.step)
        decay = ms.Tensor(s.ema_decay, ms.float32)
        self._skipped_in_a_row = 0
        try:
            while self.step < s.steps:
                self.losses.append(self._train_one(make_batch(self.step), decay))
                self.step += 1
                progress.step_done(self.step, self.losses)
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    self.save()
                    if self.on_checkpoint is not None and self.rt.is_main:
                        self.on_checkpoint(self.step)
        finally:
            progress.close()
        if self.skipped_steps:
            log.info("%s: %d fp16 steps skipped for overflowing gradients", kind, self.skipped_steps)
        if self.rt.world_size > 1:  # every rank logs it: equal digests = the ranks stayed in sync
            log.info("%s: rank %d of %d ends at step %d with weights digest %s", kind, self.rt.rank,
                     self.rt.world_size, self.step, weights_digest(self.net))
        runtime.barrier()  # the final checkpoint is on disk before any rank reads it
        return self.losses

    def _train_one(self, global_batch: tuple[np.ndarray, ...], decay: ms.Tensor) -> float:
        """One step on this rank's slice of ``global_batch``, then the EMA update; returns the loss."""
        s = self.settings
        host = runtime.shard(tuple(global_batch), s.batch_size)
        batch = tuple(ms.Tensor(a) for a in host)
        loss_t, finite_t = self._train_step(ms.Tensor(self._lr_at(self.step), ms.float32), *batch)
        loss = float(loss_t.asnumpy())
        if not math.isfinite(loss):
            kept = f"; last good checkpoint kept at {self.ckpt_path}" if self.ckpt_path.exists() else ""
            fp16 = ", or precision=fp32" if self.precision == "fp16" else ""
            raise UserError(f"training: loss became non-finite ({loss}) at step {self.step}; try a lower "
                            f"lr (now {s.lr:g}){fp16} or check the data{kept}")
        if bool(finite_t.asnumpy()):
            self._ema_step(decay)
            self._skipped_in_a_row = 0
        else:  # fp16 overflow: the step was skipped and the loss scale lowered
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            log.debug("step %d skipped: fp16 gradients overflowed", self.step)
            if self._skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise UserError(f"training: fp16 gradients overflowed on {self._skipped_in_a_row} steps in a row "
                                f"(up to step {self.step}); use precision=fp32 or a lower lr")
        return loss
