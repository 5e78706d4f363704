"""FLOPs of one forward pass of the backbone, counted from the layers it runs."""
from __future__ import annotations

from typing import Any

import numpy as np

from teacher.unet import Attention


def forward_flops(net: Any, image_shape: tuple[int, ...], num_classes: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one forward pass of ``net`` on ONE image, by layer type.

    Counted from the layers a forward pass runs (forward hooks): convolutions, dense layers and
    the attention matmuls; normalisation and element-wise ops are left out (a few percent).
    """
    import mindspore as ms
    from mindspore import nn

    counts: dict[str, float] = {"conv": 0.0, "dense": 0.0, "attention": 0.0}

    def hook(cell: Any, inputs: Any, output: Any) -> None:
        if isinstance(cell, nn.Conv2d):
            kh, kw = cell.kernel_size
            counts["conv"] += 2.0 * np.prod(output.shape) * (cell.in_channels // cell.group) * kh * kw
        elif isinstance(cell, nn.Dense):
            counts["dense"] += 2.0 * np.prod(output.shape) * cell.in_channels
        elif isinstance(cell, Attention):
            b, c, h, w = inputs[0].shape
            counts["attention"] += 2.0 * 2 * b * (h * w) ** 2 * c  # q^T k and v attn^T

    handles = [c.register_forward_hook(hook) for _, c in net.cells_and_names()
               if isinstance(c, (nn.Conv2d, nn.Dense, Attention))]
    try:
        x = ms.Tensor(np.zeros((1, *image_shape), np.float32))
        y = ms.Tensor(np.array([num_classes - 1], np.int32))
        one = ms.Tensor(np.ones(1, np.float32))
        net(x, one * 0.5, y, one)
    finally:
        for h in handles:
            h.remove()
    return {**counts, "total": float(sum(counts.values()))}
