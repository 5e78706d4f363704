"""The 16-step sampler with MindSpore's GroupNorm against the same norm written as a LayerNorm over the groups
plus the per-channel affine (equal outputs to ~1e-6), both in one process, interleaved (docs/sampling.md):

    python docs/scripts/groupnorm_forms.py outputs/digits default 16,64,256
    python docs/scripts/groupnorm_forms.py outputs/digits 1 1,16
"""
import sys
import time

import numpy as np
from hydra import compose, initialize_config_module
from mindspore import nn, ops

from distill.core import build, sampling
from distill.core.config import register
from distill.core.data import load_data
from distill.core.runtime import setup_from_config
from student.loading import load_student
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher


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
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run}", f"cpu_threads={'null' if threads == 'default' else threads}"])
    setup_from_config(cfg)
    data = load_data(cfg.data)
    settings = build.sampler_settings(cfg)
    predictors = {}
    for form in ("native", "layernorm"):
        student, _ = load_student(cfg, data)
        teacher = load_teacher(cfg, data)
        if form == "layernorm":
            swap_norms(student)
            swap_norms(teacher)
        predictors[f"student_{form}"] = sampling.jit_predictor(ConditionalPrediction(student.set_train(False)))
        predictors[f"teacher_{form}"] = sampling.jit_predictor(GuidedPrediction(teacher.set_train(False)))
    for batch in batches:
        noise = sampling.initial_noise(0, batch, data.image_shape)
        labels = np.arange(batch) % data.num_classes
        null = np.full(batch, data.num_classes)
        calls = {k: (lambda p=p: sampling.sample(p, noise, labels, 2.0, settings, null)) for k, p in predictors.items()}
        for _ in range(2):  # compile and warm
            outs = {k: np.asarray(c()) for k, c in calls.items()}
        diff = max(np.abs(outs[f"{m}_native"] - outs[f"{m}_layernorm"]).max() for m in ("student", "teacher"))
        times: dict[str, list[float]] = {k: [] for k in calls}
        keys = list(calls)
        for r in range(9 if batch < 256 else 5):  # interleaved, the order rotating
            for k in keys[r % 4:] + keys[:r % 4]:
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1000 * float(np.median(v)) / settings.num_steps for k, v in times.items()}
        print(f"threads {threads} batch {batch} (max abs diff {diff:.1e}), ms/step: "
              + " ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")])
