"""The noise-aware classifier p(y | z_t, t) of classifier guidance (Dhariwal & Nichol 2021).

A small time-conditioned encoder made of the UNet's own parts (its time embedding, res blocks and
down-sampling): conv -> [res block -> down] per level -> res block -> norm, SiLU, mean pool -> dense.
It is trained with cross-entropy on noisy inputs z_t = alpha_t x + sigma_t eps at uniform t, and is
the *guide* only: the evaluation classifier that judges samples (distill.core.classifier) stays separate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from distill.core import diffusion as dm
from distill.core.data import ImageData, step_batches
from distill.core.errors import UserError
from teacher.unet import Downsample, EmbeddingMLP, ResBlock, conv3x3

CLASSIFIER_STREAM = 11  # the classifier's draws (t, noise) apart from the other objectives' streams


@dataclass(frozen=True)
class NoisyClassifierConfig:
    """Everything needed to rebuild the network (stored in its checkpoint)."""

    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 32
    levels: int = 2             # res block + 2x down-sampling per level (the last level keeps its size)
    groups: int = 8
    time_scale: float = 1000.0  # t in [0, 1] is scaled before the sinusoidal features, as in the UNet

    def validate(self) -> None:
        check_classifier_shape(self.width, self.levels, self.groups)
        if self.image_size % 2 ** (self.levels - 1):
            raise UserError(f"classifier: image size {self.image_size} cannot be halved {self.levels - 1} time(s) "
                            f"(classifier.levels={self.levels})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_classifier_shape(width: int, levels: int, groups: int) -> None:
    """The ``classifier`` section's sizes, without the data (the image size is checked when the net is built)."""
    if width < 1 or levels < 1 or groups < 1 or width % groups:
        raise UserError(f"classifier: width {width} must be >= 1 and divisible by groups {groups}, levels {levels} >= 1")


class NoisyClassifier(nn.Cell):
    """``construct(z, t) -> logits`` (B, num_classes); ``embed(t)`` and ``logits(z, emb)`` split it so a
    sampler embeds the times of all its steps once, as it does for the UNet's conditioning."""

    def __init__(self, config: NoisyClassifierConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w, emb_dim = config.width, 4 * config.width
        self.time_embed = EmbeddingMLP(w, emb_dim, config.time_scale)
        self.conv_in = conv3x3(config.in_channels, w)
        self.blocks = nn.CellList([ResBlock(w, w, emb_dim, config.groups) for _ in range(config.levels)])
        self.downs = nn.CellList([Downsample(w) for _ in range(config.levels - 1)])
        self.norm_out = nn.GroupNorm(config.groups, w)
        self.act = nn.SiLU()
        self.head = nn.Dense(w, config.num_classes)

    def embed(self, t: ms.Tensor) -> ms.Tensor:
        return self.time_embed(t)

    def logits(self, z: ms.Tensor, emb: ms.Tensor) -> ms.Tensor:
        h = self.conv_in(z)
        for i in range(len(self.downs)):
            h = self.downs[i](self.blocks[i](h, emb))
        h = self.blocks[-1](h, emb)
        return self.head(self.act(self.norm_out(h)).mean(axis=(2, 3)))

    def construct(self, z: ms.Tensor, t: ms.Tensor) -> ms.Tensor:
        return self.logits(z, self.embed(t))


def log_prob_of(logits: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
    """log p(y | .) per example (B,) from logits (B, K) and class indices (B,)."""
    logp = ops.log_softmax(logits, axis=-1)
    return (logp * ops.one_hot(y, logits.shape[-1], ms.Tensor(1.0, logits.dtype), ms.Tensor(0.0, logits.dtype))
            ).sum(axis=-1)


class LogProbSum(nn.Cell):
    """sum_b log p(y_b | z_b, t_b): its gradient in z is every example's grad_z log p(y | z, t), the examples
    being independent."""

    def __init__(self, classifier: NoisyClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def construct(self, z: ms.Tensor, emb: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        return log_prob_of(self.classifier.logits(z, emb), y).sum()


class LogProbGrad(nn.Cell):
    """``(z, emb, y) -> grad_z log p(y | z, t)`` by MindSpore autodiff (``ops.GradOperation``, first input),
    a cell so it compiles inside a sampler step or loop; the classifier's weights get no gradient."""

    def __init__(self, classifier: NoisyClassifier) -> None:
        super().__init__()
        self.log_prob = LogProbSum(classifier)
        self.grad = ops.GradOperation()

    def construct(self, z: ms.Tensor, emb: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        return self.grad(self.log_prob)(z, emb, y)


def classifier_loss(net: NoisyClassifier, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
    """Cross-entropy of the classes of noisy inputs."""
    return ops.cross_entropy(net(z, t), y)


def classifier_batch_maker(data: ImageData, batch_size: int, seed: int, start_step: int, schedule: str
                           ) -> Callable[[int], tuple[np.ndarray, ...]]:
    """Host-side batches for :func:`classifier_loss`: (z_t, t, y) at t ~ U[0, 1] on the diffusion schedule."""
    draw = step_batches(data, batch_size, seed, start_step, CLASSIFIER_STREAM)

    def make(step: int) -> tuple[np.ndarray, ...]:
        x, y, rng = draw(step)
        t = rng.uniform(0.0, 1.0, x.shape[0]).astype(np.float32)
        eps = rng.standard_normal(x.shape).astype(np.float32)
        z, _, _ = dm.noisy_at(schedule, x, eps, t)
        return z, t, y.astype(np.int32)

    return make


def noisy_accuracy(net: NoisyClassifier, images: np.ndarray, labels: np.ndarray, t: float, schedule: str, seed: int,
                   batch_size: int = 256) -> float:
    """Accuracy on ``images`` noised to time ``t`` (seeded noise, so every call sees the same z_t)."""
    eps = np.random.default_rng((int(seed), CLASSIFIER_STREAM)).standard_normal(images.shape).astype(np.float32)
    z, _, _ = dm.noisy_at(schedule, np.asarray(images, np.float32), eps, np.full(len(images), t, np.float32))
    pred = [net(ms.Tensor(z[i:i + batch_size]), ms.Tensor(np.full(len(z[i:i + batch_size]), t, np.float32)))
            .asnumpy().argmax(axis=1) for i in range(0, len(z), batch_size)]
    return float(np.mean(np.concatenate(pred) == np.asarray(labels).reshape(-1)))
