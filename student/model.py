"""The student: the teacher's backbone plus a guidance-weight embedding, initialised from the teacher."""
from __future__ import annotations

import dataclasses

from distill.core.errors import UserError
from distill.core.weights import load_net_state, net_state
from teacher.unet import UNet, UNetConfig


def student_config(teacher_config: UNetConfig, embed_dim: int, w_scale: float,
                   class_gate: bool = False, film: bool = False, negative: bool = False) -> UNetConfig:
    if embed_dim < 2 or embed_dim % 2:
        raise UserError(f"student: guidance embed_dim {embed_dim} must be an even number >= 2")
    return dataclasses.replace(teacher_config, guidance_embed_dim=embed_dim, guidance_scale=float(w_scale),
                               guidance_class_gate=bool(class_gate), guidance_film=bool(film),
                               guidance_negative=bool(negative))


def student_from_teacher(teacher: UNet, embed_dim: int, w_scale: float, class_gate: bool = False,
                         film: bool = False, negative: bool = False) -> UNet:
    """A student equal to the teacher's conditional model: shared weights copied, the
    guidance MLPs' last layers at zero, so the w terms change nothing until trained
    (``negative``: the same student with a negative-class input, :meth:`UNet.embed`)."""
    student = UNet(student_config(teacher.config, embed_dim, w_scale, class_gate, film, negative))
    fresh = load_net_state(student, net_state(teacher), "teacher weights", strict=False)
    # student-only cells are the ones named guidance_* (embedding, gate, per-block film), at any depth
    unexpected = [name for name in fresh if not any(part.startswith("guidance_") for part in name.split("."))]
    if unexpected:
        raise UserError(f"teacher weights do not cover the student backbone (missing {unexpected[:3]})")
    return student


NEGATIVE_PATH = "negative_"  # name prefix of the phase-two student's own cells (the MLP, each block's film term)


def is_negative_path(name: str) -> bool:
    """Whether parameter ``name`` belongs to the phase-two negative path (at any depth)."""
    return any(part.startswith(NEGATIVE_PATH) for part in name.split("."))


def negative_phase_student(stage_one: UNet) -> UNet:
    """The stage-one student with a negative-class input and its own zero-initialised negative path
    (:class:`teacher.unet.NegativePath`), every stage-one weight copied: with the null negative it is
    the stage-one student bit for bit, and until trained it is that student for every negative class."""
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
