"""Device, seed, precision, data-parallel and execution-mode set-up, shared by every task.

``setup_runtime`` is called once per process (``distill.app.run`` does it from the config) and
records what it set up in a :class:`Runtime` that the training loop and the jobs read with
:func:`current` / :func:`is_main`. Without a call the defaults hold: CPU, fp32, one process.

Data parallel (``distributed=true``) runs one process per device under ``msrun``: every worker
sets its device, calls ``communication.init()`` and sets the DATA_PARALLEL context with
``gradients_mean=True``; the training step then averages gradients with
``nn.DistributedGradReducer`` (see :mod:`distill.training`). Only rank 0 writes files.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

import numpy as np
import mindspore as ms

from distill.core.errors import UserError

DEVICES = ("CPU", "GPU", "Ascend")
PRECISIONS = ("fp32", "fp16", "bf16")
# Keyword arguments of mindspore.jit and the backend options it passes on (mindspore 2.10).
JIT_KEYS = ("jit_level", "backend", "dynamic", "fullgraph", "exec_order", "disable_format_transform",
            "auto_offload")
JIT_LEVELS = ("O0", "O1")
# Environment variables set by the launchers MindSpore supports (msrun / dynamic cluster, rank table, mpirun).
LAUNCHER_ENV = ("MS_ROLE", "RANK_TABLE_FILE", "OMPI_COMM_WORLD_SIZE")
# CPU collectives give up after 30 s by default; rank 0 alone writes reports and checks the
# teacher while the other ranks wait at their next collective, so allow more (seconds).
CPU_COMM_TIMEOUT = "1800"
# oneDNN (MindSpore's CPU kernels) picks its widest instruction set; on some virtual CPUs its AVX-512
# kernels are far slower (measured on this project's 2-core AMD EPYC: a 3x3 conv at batch 128
# 243 ms vs 2.6 ms with AVX2), so CPU runs cap it with `cpu_max_isa` unless the environment already does.
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
CPU_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
            "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "ALL")
DEFAULT_CPU_ISA = "AVX2"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: str = "CPU"
    precision: str = "fp32"
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    jit_options: Mapping[str, Any] = field(default_factory=dict)
    cpu_threads: Optional[int] = None  # MindSpore's CPU kernel threads as set in this process (None: its default)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, TensorBoard and reports."""
        return self.rank == 0


_current = Runtime()


def current() -> Runtime:
    return _current


def is_main() -> bool:
    return _current.is_main


def check_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device != "Ascend":
        raise UserError(f"precision=bf16 needs Ascend (device is {device}); use precision=fp32 or fp16")
    return precision


def check_jit_options(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The non-null ``graph_mode_options`` as keyword arguments of ``mindspore.jit``."""
    opts = {str(k): v for k, v in dict(options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(JIT_KEYS))
    if unknown:
        raise UserError(f"graph_mode_options: unknown option(s) {', '.join(unknown)} "
                        f"(known: {', '.join(JIT_KEYS)})")
    if "jit_level" in opts and opts["jit_level"] not in JIT_LEVELS:
        raise UserError(f"graph_mode_options.jit_level '{opts['jit_level']}' is not one of {', '.join(JIT_LEVELS)}")
    return opts


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``mindspore.jit(fn)`` with the configured ``graph_mode_options``."""
    return ms.jit(fn, **dict(_current.jit_options))


def setup_runtime(device: str = "CPU", seed: int = 0, deterministic: bool = True, *, precision: str = "fp32",
                  distributed: bool = False, graph_mode_options: Optional[Mapping[str, Any]] = None,
                  cpu_max_isa: Optional[str] = DEFAULT_CPU_ISA, cpu_threads: Optional[int] = None) -> Runtime:
    """Select the device target, seed MindSpore, and (``distributed``) join the data-parallel group."""
    global _current
    if device not in DEVICES:
        raise UserError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    isa = check_cpu_isa(cpu_max_isa)
    cpu_threads = check_cpu_threads(cpu_threads)
    check_precision(precision, device)
    jit_options = check_jit_options(graph_mode_options)
    if distributed and _current.distributed:  # already joined (a second task in the same process)
        _current = replace(_current, precision=precision, jit_options=jit_options)
        ms.set_seed(seed)
        return _current
    if distributed and not any(k in os.environ for k in LAUNCHER_ENV):
        raise UserError("distributed=true needs a launcher: start the workers with msrun --worker_num=N "
                        "--local_worker_num=N ... (see docs/distributed.md)")
    os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ logging to errors
    if device == "CPU" and isa is not None:  # read when oneDNN makes its first kernel; the user's own value wins
        os.environ.setdefault(ONEDNN_ISA_ENV, isa)
    if not _device_available(device):  # asked first: set_device would log its own errors to stderr
        raise UserError(f"device '{device}' is not available here (this MindSpore build or machine has no "
                        f"{device} support)")
    try:
        ms.set_device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"device '{device}' is not available here ({str(e).splitlines()[0]})") from e
    if deterministic:
        _set_deterministic_once()
    threads = _set_cpu_threads_once(cpu_threads)
    ms.set_seed(seed)
    rank, world = 0, 1
    if distributed:
        rank, world = _join_data_parallel(device)
    _current = Runtime(device, precision, distributed, rank, world, jit_options, threads)
    if distributed:
        _quiet_other_ranks()
        log.info("data parallel: rank %d of %d on %s", rank, world, device)
    return _current


def check_cpu_isa(isa: Optional[str]) -> Optional[str]:
    """``cpu_max_isa`` in oneDNN's spelling (upper case), or None to leave the choice to oneDNN."""
    if isa is None:
        return None
    if str(isa).upper() not in CPU_ISAS:
        raise UserError(f"cpu_max_isa '{isa}' is not one of {', '.join(CPU_ISAS)} (or null: oneDNN's own choice)")
    return str(isa).upper()


def _device_available(device: str) -> bool:
    import mindspore.device_context as dc

    return bool(getattr(dc, device.lower()).is_available())


def check_cpu_threads(threads: Any) -> Optional[int]:
    """``cpu_threads`` as a positive int, or None (MindSpore's default)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"cpu_threads must be a positive integer or null, got {threads}")
    return threads


def _set_cpu_threads_once(threads: Optional[int]) -> Optional[int]:
    """Set the thread count of MindSpore's CPU kernels (``threads`` as checked by :func:`check_cpu_threads`;
    None: MindSpore's default) and return the count in force. MindSpore takes it once per process; a later
    set-up in the same process keeps the first value."""
    if threads is None:
        return _current.cpu_threads
    import mindspore.device_context as dc

    try:
        dc.cpu.op_tuning.threads_num(threads)
    except RuntimeError as e:
        if "repeatedly" not in str(e):
            raise
        if _current.cpu_threads != threads:
            log.warning("cpu_threads=%d not applied: MindSpore fixes its CPU thread count once per process (%s here)",
                        threads, _current.cpu_threads or "MindSpore's default")
        return _current.cpu_threads
    return threads


def _set_deterministic_once() -> None:
    try:
        ms.set_deterministic(True)
    except RuntimeError as e:  # "can not be set repeatedly": a second set-up in the same process
        if "repeatedly" not in str(e):
            raise


def setup_from_config(cfg: Any) -> Runtime:
    """``setup_runtime`` from the top-level config keys (device, seed, precision, distributed, graph_mode_options,
    cpu_max_isa, cpu_threads)."""
    return setup_runtime(str(cfg.device), int(cfg.seed), precision=str(cfg.get("precision", "fp32")),
                         distributed=bool(cfg.get("distributed", False)),
                         graph_mode_options=_plain(cfg.get("graph_mode_options")),
                         cpu_max_isa=cfg.get("cpu_max_isa", DEFAULT_CPU_ISA),
                         cpu_threads=cfg.get("cpu_threads", None))


def _plain(section: Any) -> Optional[dict[str, Any]]:
    if section is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


def _join_data_parallel(device: str) -> tuple[int, int]:
    from mindspore.communication import get_group_size, get_rank, init

    if device == "CPU":
        os.environ.setdefault("MS_CPU_COMM_OP_TIMEOUT", CPU_COMM_TIMEOUT)
    try:
        init()
    except RuntimeError as e:
        raise UserError(f"distributed=true: could not join the worker group ({str(e).strip().splitlines()[0]})") from e
    rank, world = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return rank, world


def _quiet_other_ranks() -> None:
    """Ranks other than 0 write no log file (their console output goes to msrun's worker log)."""
    if _current.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process). ``Barrier`` has no CPU kernel: all-reduce instead."""
    if _current.world_size > 1:
        sum_over_ranks(np.ones(1, np.float32))


def sum_over_ranks(x: np.ndarray) -> np.ndarray:
    """Element-wise sum of ``x`` over all ranks (``x`` itself in one process)."""
    if _current.world_size == 1:
        return x
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(x)).asnumpy()


def broadcast_from_main(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Rank 0's ``arrays`` on every rank, exactly (float32; one all-reduce in which the other ranks add zeros).

    Not ``ops.Broadcast``: on CPU (mindspore 2.10) broadcasting the whole parameter tuple returned
    zeros for the later tensors.
    """
    if _current.world_size == 1:
        return list(arrays)
    flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])
    total = sum_over_ranks(flat if _current.is_main else np.zeros_like(flat))
    out, start = [], 0
    for a in arrays:
        out.append(total[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def main_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: a choice made from files only rank 0 may see (what is up to date,
    what is missing) that every rank must follow, or they would wait at different collectives."""
    return bool(broadcast_from_main([np.array([float(bool(flag))], np.float32)])[0][0])


def my_items(count: int) -> list[int]:
    """The items of ``range(count)`` this rank works on: every ``world_size``-th from its rank on.
    Any count splits (some ranks get one item more, or none); one process gets them all."""
    return list(range(_current.rank, count, _current.world_size))


GATHER_CHUNK = 1 << 24  # floats per all-reduce when gathering (64 MB), so big sample sets need no second copy at once


def gather_rows(rows: np.ndarray, mine: np.ndarray, total: int) -> np.ndarray:
    """All ranks' rows in one (total, ...) float32 array on every rank: this rank's ``rows`` go to the
    indices ``mine``, the others' to theirs (the ranks' indices must not overlap).

    Exact: one all-reduce in which every rank adds zeros where it has no row (x + 0 == x).
    """
    rows = np.asarray(rows, np.float32)
    out = np.zeros((total, *rows.shape[1:]), np.float32)
    out[np.asarray(mine, np.int64)] = rows
    if _current.world_size == 1:
        return out
    flat = out.reshape(-1)
    for start in range(0, flat.size, GATHER_CHUNK):
        flat[start:start + GATHER_CHUNK] = sum_over_ranks(flat[start:start + GATHER_CHUNK])
    return out


def shard(arrays: tuple[np.ndarray, ...], global_batch: int) -> tuple[np.ndarray, ...]:
    """This rank's contiguous slice of a global batch; arrays already of the local size pass through.

    Every rank draws the same global batch from the same seeded stream and keeps rows
    ``[rank * b, (rank + 1) * b)`` with ``b = global_batch / world_size``, so the ranks together
    see exactly the batch a single process would.
    """
    rt = _current
    if rt.world_size == 1:
        return tuple(arrays)
    local = local_batch_size(global_batch)
    out = []
    for a in arrays:
        if a.shape[0] == global_batch:
            out.append(a[rt.rank * local:(rt.rank + 1) * local])
        elif a.shape[0] == local:
            out.append(a)
        else:
            raise ValueError(f"batch array with leading size {a.shape[0]} is neither the global batch "
                             f"{global_batch} nor this rank's share {local}")
    return tuple(out)


def data_share() -> Optional[tuple[int, int]]:
    """(rank, world size) under data parallelism, else None: for a batch stream that reads only the
    rows :func:`shard` keeps (:func:`distill.core.data.iterate_batches`)."""
    return (_current.rank, _current.world_size) if _current.world_size > 1 else None


def local_batch_size(global_batch: int) -> int:
    world = _current.world_size
    if global_batch % world:
        raise UserError(f"batch_size {global_batch} cannot be split evenly over {world} data-parallel workers")
    return global_batch // world
