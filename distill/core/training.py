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

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import mindspore as ms
from mindspore import amp, nn, ops
from tqdm import tqdm

from distill.core import runtime
from distill.core.checkpoint import load_checkpoint, save_checkpoint
from distill.core.errors import UserError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.safetensors"
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


def make_optimizer(net: nn.Cell, settings: TrainSettings) -> tuple[nn.Optimizer, list[tuple[ms.Parameter, float]]]:
    """AdamW over ``net``'s trainable parameters, one lr group per distinct factor of
    ``settings.param_lr_scale``; also the optimizer's lr Parameters with their factors (the train
    step assigns ``lr * factor`` to each)."""
    named = _named_params(net)  # names inside net: Parameter.name gains prefixes once net sits in other cells
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
    """Trains ``net`` (keeping an EMA copy ``ema``) on ``loss_fn`` in ``out_dir``.

    Under fp16/bf16 ``net`` itself is cast for training (``auto_mixed_precision`` works in place);
    sample from ``ema``, which stays fp32.
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
        self.ema_update = EMAUpdate(ema, net)
        self.optimizer, self._lr_params = make_optimizer(net, settings)
        # The learning rate is an input of the train step, assigned to the optimizer's own copy inside
        # it: set_data on a Parameter from the host between jitted calls was not seen by the compiled
        # graph in the distillation job (the schedule silently stayed at the base lr).
        self.scaler: Optional[amp.DynamicLossScaler] = None
        train_net = net
        if self.precision in ("fp16", "bf16"):
            dtype = ms.float16 if self.precision == "fp16" else ms.bfloat16
            train_net = amp.auto_mixed_precision(net, "O2", dtype=dtype)  # output cast back to fp32
        if self.precision == "fp16":
            self.scaler = amp.DynamicLossScaler(settings.loss_scale, 2, settings.loss_scale_window)
        self._train_step = self._build_step(train_net, loss_fn)
        jit = runtime.jit if settings.use_jit else (lambda f: f)

        def ema_step(decay):
            return self.ema_update(decay)

        self._ema_step = jit(ema_step)
        self.step = 0
        self.losses: list[float] = []
        self.skipped_steps = 0

    def _build_step(self, train_net: nn.Cell, loss_fn: Callable[..., ms.Tensor]) -> Callable[..., Any]:
        """The jitted step: (global-mean loss, grads finite) from one local batch; updates the weights."""
        settings, scaler, optimizer = self.settings, self.scaler, self.optimizer
        world = self.rt.world_size
        clip = settings.grad_clip
        lr_params = self._lr_params

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

        if clip > 0:
            def clipped(grads):
                return ops.clip_by_global_norm(grads, clip)
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

        return runtime.jit(train_step) if settings.use_jit else train_step

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        tensors = {f"net.{k}": v for k, v in net_state(self.net).items()}
        tensors.update({f"ema.{k}": v for k, v in net_state(self.ema).items()})
        for name, p in self.optimizer.parameters_and_names():
            if name.startswith(("adam_m.", "adam_v.")) or name == "global_step":
                tensors[f"opt.{name}"] = p.asnumpy()
        if self.scaler is not None:
            tensors["amp.scale_value"] = self.scaler.scale_value.asnumpy()
            tensors["amp.counter"] = self.scaler.counter.asnumpy()
        tensors["losses"] = np.asarray(self.losses, np.float32)
        return tensors

    def save(self) -> None:
        """Write the checkpoint atomically (rank 0 only; the other ranks hold the same weights)."""
        if not self.rt.is_main:
            return
        meta = dict(self.meta, step=self.step, total_steps=self.settings.steps, precision=self.precision,
                    data_parallel_workers=self.rt.world_size)
        save_checkpoint(self.ckpt_path, self.state(), meta)

    def try_resume(self) -> bool:
        if self.rt.is_main:
            _remove_stale_temp_files(self.ckpt_path)
        if not self.ckpt_path.exists():
            return False
        tensors, meta = load_checkpoint(self.ckpt_path)
        for key in ("kind", "model"):
            if key in self.meta and meta.get(key) != self.meta[key]:
                diff = _difference(key, meta.get(key), self.meta[key])
                raise UserError(f"{self.ckpt_path} holds a different run ({diff}; checkpoint vs now); "
                                "use another output dir or remove it")
        load_net_state(self.net, _strip(tensors, "net."), str(self.ckpt_path))
        load_net_state(self.ema, _strip(tensors, "ema."), str(self.ckpt_path))
        for name, p in self.optimizer.parameters_and_names():
            if f"opt.{name}" in tensors:
                p.set_data(ms.Tensor(tensors[f"opt.{name}"]))
        if self.scaler is not None and "amp.scale_value" in tensors:
            self.scaler.scale_value.set_data(ms.Tensor(tensors["amp.scale_value"]))
            self.scaler.counter.set_data(ms.Tensor(tensors["amp.counter"]))
        self.step = int(meta.get("step", 0))
        self.losses = [float(x) for x in tensors.get("losses", np.zeros(0))]
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)
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
        show_bar = self.rt.is_main and sys.stderr.isatty()  # else (logs, msrun workers) a log line per log_every
        bar = tqdm(total=s.steps, initial=self.step, desc=kind, unit="step", mininterval=2.0,
                   dynamic_ncols=True, disable=not show_bar)
        make_batch = self.batch_factory(self.step)
        t_last, steps_last = time.perf_counter(), self.step
        decay = ms.Tensor(s.ema_decay, ms.float32)
        skipped_in_a_row = 0
        try:
            while self.step < s.steps:
                host = runtime.shard(tuple(make_batch(self.step)), s.batch_size)
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
                    skipped_in_a_row = 0
                else:  # fp16 overflow: the step was skipped and the loss scale lowered
                    self.skipped_steps += 1
                    skipped_in_a_row += 1
                    log.debug("step %d skipped: fp16 gradients overflowed", self.step)
                    if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                        raise UserError(f"training: fp16 gradients overflowed on {skipped_in_a_row} steps in a row "
                                        f"(up to step {self.step}); use precision=fp32 or a lower lr")
                self.losses.append(loss)
                self.step += 1
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    self._log_progress(bar, kind, steps_last, t_last)
                    t_last, steps_last = time.perf_counter(), self.step
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    self.save()
                    if self.on_checkpoint is not None and self.rt.is_main:
                        self.on_checkpoint(self.step)
        finally:
            bar.close()
        if self.skipped_steps:
            log.info("%s: %d fp16 steps skipped for overflowing gradients", kind, self.skipped_steps)
        if self.rt.world_size > 1:  # every rank logs it: equal digests = the ranks stayed in sync
            log.info("%s: rank %d of %d ends at step %d with weights digest %s", kind, self.rt.rank,
                     self.rt.world_size, self.step, weights_digest(self.net))
        runtime.barrier()  # the final checkpoint is on disk before any rank reads it
        return self.losses

    def _log_progress(self, bar: tqdm, kind: str, steps_last: int, t_last: float) -> None:
        s = self.settings
        rate = (self.step - steps_last) / max(time.perf_counter() - t_last, 1e-9)
        recent = float(np.mean(self.losses[-s.log_every:]))
        bar.set_postfix(loss=f"{recent:.4f}", steps_per_s=f"{rate:.2f}")
        if bar.disable and self.rt.is_main:
            log.info("%s: step %d/%d loss %.4f (%.2f steps/s)", kind, self.step, s.steps, recent, rate)
        if self.writer is not None:
            self.writer.add_scalar(f"{kind}/loss", recent, self.step)
            self.writer.add_scalar(f"{kind}/steps_per_s", rate, self.step)


def _difference(key: str, old: Any, new: Any) -> str:
    """``model: channels 8 vs 16`` -- only the entries that differ, for a one-line message."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return f"{key}: " + ", ".join(f"{k} {old.get(k)} vs {new.get(k)}" for k in keys)
    return f"{key}: {old} vs {new}"


def weights_digest(net: nn.Cell) -> str:
    """SHA-256 (first 16 hex digits) of the trainable weights, by name: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, value in sorted(net_state(net).items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


def _remove_stale_temp_files(path: Path) -> None:
    """Temp files an interrupted atomic write left beside ``path`` (a kill -9 mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s left by an interrupted checkpoint write", tmp)


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
