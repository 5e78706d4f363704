"""The student: the teacher's backbone plus a guidance-weight embedding, initialised from the teacher."""
from __future__ import annotations

import dataclasses

import numpy as np
import mindspore as ms
from mindspore import nn

from distill.core.diffusion import split_heads
from distill.core.errors import UserError
from distill.core.weights import load_net_state, net_state
from teacher.guidance import ConditionalPrediction
from teacher.unet import UNet, UNetConfig


def student_config(teacher_config: UNetConfig, embed_dim: int, w_scale: float,
                   class_gate: bool = False, film: bool = False, negative: bool = False,
                   uncond_head: bool = False, class_ramp: float = 0.0) -> UNetConfig:
    if embed_dim < 2 or embed_dim % 2:
        raise UserError(f"student: guidance embed_dim {embed_dim} must be an even number >= 2")
    return dataclasses.replace(teacher_config, guidance_embed_dim=embed_dim, guidance_scale=float(w_scale),
                               guidance_class_gate=bool(class_gate), guidance_film=bool(film),
                               guidance_negative=bool(negative), guidance_uncond_head=bool(uncond_head),
                               guidance_class_ramp=float(class_ramp))


OUTPUT_CONV = ("conv_out.weight", "conv_out.bias")  # the last conv: a CFG++ student doubles its output channels


def student_from_teacher(teacher: UNet, embed_dim: int, w_scale: float, class_gate: bool = False,
                         film: bool = False, negative: bool = False, uncond_head: bool = False,
                         class_ramp: float = 0.0) -> UNet:
    """A student equal to the teacher's conditional model: shared weights copied, the
    guidance MLPs' last layers at zero, so the w terms change nothing until trained
    (``negative``: the same student with a negative-class input, :meth:`UNet.embed`; ``class_ramp`` r > 0:
    the class offset also x min(w / r, 1), so the student is the teacher at the null class at w = 0).
    ``uncond_head`` (``student.target=cfgpp``): the last convolution twice over, stacked on its output
    channels, so the untrained student returns (cond, cond) as its (guided, unconditional) heads."""
    student = UNet(student_config(teacher.config, embed_dim, w_scale, class_gate, film, negative, uncond_head,
                                  class_ramp))
    state = net_state(teacher)
    if uncond_head:
        state.update({k: np.concatenate([state[k], state[k]], axis=0) for k in OUTPUT_CONV})
    fresh = load_net_state(student, state, "teacher weights", strict=False)
    # student-only cells are the ones named guidance_* (embedding, gate, per-block film), at any depth
    unexpected = [name for name in fresh if not any(part.startswith("guidance_") for part in name.split("."))]
    if unexpected:
        raise UserError(f"teacher weights do not cover the student backbone (missing {unexpected[:3]})")
    return student


def check_one_head(net: UNet, what: str) -> None:
    """Refuse a CFG++ student (two output heads) where only a CFG student's one output is understood."""
    if net.config.guidance_uncond_head:
        raise UserError(f"{what} takes a CFG student; this one was distilled with student.target=cfgpp (two output "
                        f"heads): evaluate it with task=evaluate eval.progressive=false")


NEGATIVE_PATH = "negative_"  # name prefix of the phase-two student's own cells (the MLP, each block's film term)


def is_negative_path(name: str) -> bool:
    """Whether parameter ``name`` belongs to the phase-two negative path (at any depth)."""
    return any(part.startswith(NEGATIVE_PATH) for part in name.split("."))


def negative_phase_student(stage_one: UNet) -> UNet:
    """The stage-one student with a negative-class input and its own zero-initialised negative path
    (:class:`teacher.unet.NegativePath`), every stage-one weight copied: with the null negative it is
    the stage-one student bit for bit, and until trained it is that student for every negative class."""
    check_one_head(stage_one, "the negative phase")
    if stage_one.config.guidance_negative:
        raise UserError("student: the negative phase starts from a student without a negative-class input "
                        "(student.negative=false); this one was trained with negative classes already")
    if not (stage_one.config.guidance_class_gate and stage_one.config.guidance_film):
        raise UserError("student: the negative phase needs a stage-one student with class_gate=true and film=true")
    config = dataclasses.replace(stage_one.config, guidance_negative=True, guidance_negative_path=True)
    student = UNet(config)
    fresh = load_net_state(student, net_state(stage_one), "stage-one student weights", strict=False)
    unexpected = [name for name in fresh if not is_negative_path(name)]
    if unexpected:
        raise UserError(f"stage-one student weights do not cover the phase-two student (missing {unexpected[:3]})")
    return student


class CFGppStudentPrediction(ConditionalPrediction):
    """A CFG++ student (``guidance_uncond_head``) as a prediction cell: one network pass gives both things a CFG++
    step needs, the guided output at the scale lambda (its ``w`` input) and the unconditional output
    (:meth:`predict_heads`), so the sampler's CFG++ path runs it at one network call per step. Its other calls
    return the guided head alone."""

    cfgpp_heads = True

    def construct(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        return self.heads(z, t, y, w, y_uncond)[0]

    def predict(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...], w: ms.Tensor) -> ms.Tensor:
        return self.predict_heads(z, cond)[0]

    def predict_heads(self, z: ms.Tensor, cond: tuple[ms.Tensor, ...]) -> tuple[ms.Tensor, ms.Tensor]:
        """(guided, uncond) given :meth:`conditioning`'s rows: what ``SamplerStep``'s CFG++ path needs."""
        return split_heads(self.net.backbone(z, cond))

    def heads(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
              y_uncond: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        """(guided, uncond) from one network call (the eager sampler's CFG++ path)."""
        return split_heads(self.net(z, t, y, w, y_uncond))


def student_prediction(net: UNet) -> nn.Cell:
    """The prediction cell of a student: one pass; a CFG++ student's two heads when it has them."""
    return CFGppStudentPrediction(net) if net.config.guidance_uncond_head else ConditionalPrediction(net)
