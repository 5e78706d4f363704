"""Two-pass classifier-free guidance, with both branches batched into one call (2B).

Each prediction cell is ``conditioning`` (what the network takes from t, y, w and y_uncond: it does
not depend on z) followed by ``predict`` (the network on z given that conditioning). A sampler
computes the conditioning of all its steps in one call and runs only ``predict`` per step. Rows of
the conditioning are branch-major: ``passes`` blocks of the batch, conditional branch first.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from distill.core.diffusion import cfg_combine
from teacher.noisy_classifier import LogProbGrad, NoisyClassifier
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
        cond, uncond = self.branches(z, t, y, w, y_uncond)
        return cfg_combine(cond, uncond, w.reshape(-1, 1, 1, 1))

    def conditioning(self, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> tuple[ms.Tensor, ...]:
        return self.net.conditioning(ops.cat([t, t], axis=0), ops.cat([y, y_uncond], axis=0), ops.cat([w, w], axis=0))

    def predict(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...], w: ms.Tensor) -> ms.Tensor:
        cond_out, uncond_out = self.predict_branches(z, cond)
        return cfg_combine(cond_out, uncond_out, w.reshape(-1, 1, 1, 1))

    def predict_branches(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...]) -> tuple[ms.Tensor, ms.Tensor]:
        """(cond, uncond) outputs given :meth:`conditioning`'s rows (what CFG++ needs from the two passes)."""
        b = z.shape[0]
        out = self.net.backbone(ops.cat([z, z], axis=0), cond)
        return out[:b], out[b:]

    def one_pass(self) -> "ConditionalPrediction":
        """The conditional pass alone on the same weights (w = 1): the steps outside a guidance interval."""
        return ConditionalPrediction(self.net)

    def branches(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
                 y_uncond: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        """(cond, uncond) from the one doubled-batch call (w only reaches a w-conditioned net)."""
        b = z.shape[0]
        out = self.net(ops.cat([z, z], axis=0), ops.cat([t, t], axis=0),
                       ops.cat([y, y_uncond], axis=0), ops.cat([w, w], axis=0))
        return out[:b], out[b:]


class GuidanceBranches(nn.Cell):
    """The (cond, uncond) pair behind :class:`GuidedPrediction`: distillation targets for several w
    of one input are then linear combinations on the host, at the cost of one teacher call."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.guided = GuidedPrediction(net)

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
                  y_uncond: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        return self.guided.branches(z, t, y, w, y_uncond)


class ConditionalPrediction(nn.Cell):
    """One pass of the backbone on (y, w): the student, or the teacher at w = 1. ``y_uncond`` reaches
    a student with a negative-class input as its negative class; other nets ignore it."""

    passes = 1

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        return self.net(z, t, y, w, y_uncond)

    def conditioning(self, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> tuple[ms.Tensor, ...]:
        return self.net.conditioning(t, y, w, y_uncond)

    def predict(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...], w: ms.Tensor) -> ms.Tensor:
        return self.net.backbone(z, cond)


class ClassifierGuidedPrediction(nn.Cell):
    """Classifier guidance's two parts: the unconditional teacher (one pass at ``y_uncond``, the null class) and
    grad_z log p(y | z_t, t) of a noise-aware classifier, which the sampler combines
    (:func:`distill.core.diffusion.classifier_guided_output`). ``passes`` counts network passes only; the
    classifier's forward and backward come on top (``distill.core.sampling.classifier_calls_per_image``)."""

    passes = 1
    has_classifier = True

    def __init__(self, net: UNet, classifier: NoisyClassifier) -> None:
        super().__init__()
        self.net = net
        self.classifier = classifier
        self.log_prob_grad = LogProbGrad(classifier)

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        """The unconditional output (the guidance needs alpha_t and sigma_t: the sampler applies it)."""
        return self.net(z, t, y_uncond, w)

    def conditioning(self, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> tuple[ms.Tensor, ...]:
        """The unconditional net's conditioning, then the classifier's time embedding and the labels y."""
        return self.net.conditioning(t, y_uncond, w) + (self.classifier.embed(t), y)

    def predict(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...], w: ms.Tensor) -> ms.Tensor:
        return self.net.backbone(z, cond[:-2])

    def predict_and_grad(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...]) -> tuple[ms.Tensor, ms.Tensor]:
        """(unconditional output, grad_z log p(y | z, t)) given :meth:`conditioning`'s rows."""
        return self.net.backbone(z, cond[:-2]), self.log_prob_grad(z, cond[-2], cond[-1])

    def output_and_grad(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
                        y_uncond: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        return self.net(z, t, y_uncond, w), self.log_prob_grad(z, self.classifier.embed(t), y)
