"""Wall time of batch-1 sampler calls of a run's 4-step student (compiled `step` engine) alone and
right after other calls (the 16-step two-pass teacher, the eager 16-step student, a batch-256 teacher
step), to compare with the bench's batch-1 rows (README results; docs/experiments.md).

    python docs/scripts/batch1_calls.py outputs/digits
"""
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module

from distill.core import build, sampling
from distill.core.config import register
from distill.core.data import load_data
from distill.core.runtime import setup_from_config
from student.loading import load_student
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher


def calls_ms(first, then, n):
    """Milliseconds of ``then()`` over ``n`` rounds, each after one ``first()`` (if given):
    minimum, quartiles, median and maximum."""
    out = []
    for _ in range(n):
        if first is not None:
            first()
        t0 = time.perf_counter()
        then()
        out.append((time.perf_counter() - t0) * 1000)
    q = np.percentile(out, [0, 25, 50, 75, 100])
    return "min {:.1f}  q1 {:.1f}  median {:.1f}  q3 {:.1f}  max {:.1f}".format(*q)


def main(run: str) -> None:
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run}"])
    setup_from_config(cfg)
    data = load_data(cfg.data)
    base = build.sampler_settings(cfg)
    few, _ = load_student(cfg, data, Path(run) / "progressive" / "steps_4" / "checkpoint.safetensors")
    student, _ = load_student(cfg, data)
    teacher = load_teacher(cfg, data)
    for net in (few, student, teacher):
        net.set_train(False)
    p4 = sampling.jit_predictor(ConditionalPrediction(few))
    ps = sampling.jit_predictor(ConditionalPrediction(student))
    pt = sampling.jit_predictor(GuidedPrediction(teacher))
    s4, se, s1 = (dataclasses.replace(base, num_steps=4), dataclasses.replace(base, engine="eager"),
                  dataclasses.replace(base, num_steps=1))

    def draw(predict, settings, batch):
        noise = sampling.initial_noise(0, batch, data.image_shape)
        labels = np.arange(batch) % data.num_classes
        return lambda: sampling.sample(predict, noise, labels, float(cfg.sampler.w), settings,
                                       np.full(batch, data.num_classes))

    few4, teacher16, eager16, teacher256 = draw(p4, s4, 1), draw(pt, base, 1), draw(ps, se, 1), draw(pt, s1, 256)
    for fn in (few4, teacher16, eager16, teacher256):
        fn(), fn()  # compile and warm
    print("4-step student alone, ms per call:", calls_ms(None, few4, 30))
    print("after a 16-step teacher call:", calls_ms(teacher16, few4, 20))
    print("16-step teacher, ms per call:", calls_ms(few4, teacher16, 20))
    print("after an eager 16-step student call:", calls_ms(eager16, few4, 20))
    print("after a batch-256 teacher step, ms per call:", calls_ms(teacher256, few4, 8))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits")
