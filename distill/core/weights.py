"""A network's weights by name: read, copy, load from a checkpoint or a safetensors file, digest.

Names are relative to the network (``Parameter.name`` gains an outer cell's prefix once a net
sits inside another cell, so it is not used). Every loader checks names and shapes and raises a
one-line UserError naming the source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import mindspore as ms
from mindspore import nn

from distill.core.checkpoint import load_checkpoint
from distill.core.errors import UserError
from distill.core.fileio import digest


def named_params(net: nn.Cell) -> dict[str, ms.Parameter]:
    """The trainable parameters of ``net`` by their name inside it."""
    return {name: p for name, p in net.parameters_and_names() if p.requires_grad}


def net_state(net: nn.Cell) -> dict[str, np.ndarray]:
    """Trainable parameters by their name inside ``net`` (prefix-free)."""
    return {name: p.asnumpy() for name, p in named_params(net).items()}


def load_net_state(net: nn.Cell, state: dict[str, np.ndarray], source: str, strict: bool = True) -> list[str]:
    """Copy ``state`` into ``net``; a missing or mis-shaped tensor is a UserError naming ``source``.

    With ``strict=False`` parameters absent from ``state`` keep their values and their
    names are returned (the student's guidance embedding, when loading a teacher).
    """
    require_finite(state, source)
    params = named_params(net)
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


def non_finite(state: dict[str, np.ndarray]) -> list[str]:
    """Names of the float tensors of ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]


def require_finite(state: dict[str, np.ndarray], source: str) -> None:
    """Refuse weights holding NaN or inf: a model made of them gives garbage (black samples), not an error."""
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{source} holds non-finite weights (NaN or inf in {bad[0]!r}{more}); it cannot be "
                        "used: train it again (from its last good checkpoint or from scratch)")


def copy_weights(src: nn.Cell, dst: nn.Cell) -> None:
    load_net_state(dst, net_state(src), "source network", strict=False)


def strip_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors whose name starts with ``prefix``, without it (``ema.conv.weight`` -> ``conv.weight``)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_ema_weights(path: Path, net: nn.Cell, strict: bool = True) -> dict[str, Any]:
    """Load the EMA weights of a training checkpoint into ``net``; returns its metadata."""
    tensors, meta = load_checkpoint(path)
    ema = strip_prefix(tensors, "ema.")
    if not ema:
        raise UserError(f"{path} has no EMA weights: not a training checkpoint of this project")
    load_net_state(net, ema, f"checkpoint {path}", strict=strict)
    return meta


def save_weights(net: nn.Cell, path: Path) -> None:
    """The net's parameters as safetensors (MindSpore's writer), named relative to ``net``."""
    params = [{"name": name, "data": p} for name, p in net.parameters_and_names()]
    ms.save_checkpoint(params, str(path), format="safetensors")


def load_weights(net: nn.Cell, path: Path) -> None:
    """Load a safetensors file of exactly ``net``'s parameters (every name and shape must match)."""
    try:
        params = ms.load_checkpoint(str(path), format="safetensors")
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"cannot read weights {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    load_net_state(net, {name: p.asnumpy() for name, p in params.items()}, f"weights {path}")


def weights_digest(net: nn.Cell) -> str:
    """SHA-256 (first 16 hex digits) of the trainable weights, by name: equal digests = equal weights."""
    parts: list[Any] = []
    for name, value in sorted(net_state(net).items()):
        parts += [name.encode(), value]
    return digest(*parts)[:16]
