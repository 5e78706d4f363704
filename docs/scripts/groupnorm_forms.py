"""The 16-step sampler with MindSpore's GroupNorm against the same norm written as a LayerNorm over the groups
plus the per-channel affine (equal outputs to ~1e-6), both in one process, interleaved (docs/sampling.md):

    python docs/scripts/groupnorm_forms.py outputs/digits default 16,64,256
    python docs/scripts/groupnorm_forms.py outputs/digits 1 1,16
"""
import sys

import numpy as np
from mindspore import nn, ops

from run_timing import ms_per_step, open_run, run_nets, sampler_call, student_predictor, teacher_predictor, warm


class LayerNormGroups(nn.Cell):
    """``gn`` (an nn.GroupNorm) computed by LayerNorm over each group's channels and pixels."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.gamma, self.beta = gn.num_groups, gn.gamma, gn.beta
        self.norm = ops.LayerNorm(begin_norm_axis=2, begin_params_axis=2, epsilon=gn.eps)

    def construct(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b, self.groups, -1)
        ones, zeros = ops.ones((y.shape[2],), x.dtype), ops.zeros((y.shape[2],), x.dtype)
        y = self.norm(y, ones, zeros)[0].reshape(b, c, h, w)
        return y * self.gamma.reshape(1, c, 1, 1) + self.beta.reshape(1, c, 1, 1)


def swap_norms(cell: nn.Cell) -> None:
    for name, sub in list(cell.name_cells().items()):
        if isinstance(sub, nn.GroupNorm):
            setattr(cell, name, LayerNormGroups(sub))
        else:
            swap_norms(sub)


def main(run: str, threads: str, batches: list[int]) -> None:
    cfg, data, settings = open_run(run, threads)
    predictors = {}
    for form in ("native", "layernorm"):
        student, teacher = run_nets(cfg, data)
        if form == "layernorm":
            swap_norms(student)
            swap_norms(teacher)
        predictors[f"student_{form}"] = student_predictor(student)
        predictors[f"teacher_{form}"] = teacher_predictor(teacher)
    for batch in batches:
        calls = {k: sampler_call(p, batch, data, settings) for k, p in predictors.items()}
        outs = warm(calls, 2)  # compile and warm
        diff = max(np.abs(outs[f"{m}_native"] - outs[f"{m}_layernorm"]).max() for m in ("student", "teacher"))
        ms = ms_per_step(calls, 9 if batch < 256 else 5, settings.num_steps)
        print(f"threads {threads} batch {batch} (max abs diff {diff:.1e}), ms/step: "
              + " ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")])
