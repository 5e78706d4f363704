"""Two-pass classifier-free guidance, with both branches batched into one call (2B)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from distill.diffusion import cfg_combine
from teacher.unet import UNet


class GuidedPrediction(nn.Cell):
    """``uncond + w * (cond - uncond)`` from one backbone call on a doubled batch.

    ``y_uncond`` is the null class for plain CFG, or another class for negative-class
    guidance. Same call signature as the student's one-pass prediction, so samplers,
    evaluation and benchmarks take either.
    """

    passes = 2

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        b = z.shape[0]
        out = self.net(ops.cat([z, z], axis=0), ops.cat([t, t], axis=0),
                       ops.cat([y, y_uncond], axis=0), ops.cat([w, w], axis=0))
        cond, uncond = out[:b], out[b:]
        return cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1))


class ConditionalPrediction(nn.Cell):
    """One pass of the backbone on (y, w): the student, or the teacher at w = 1."""

    passes = 1

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        return self.net(z, t, y, w)
