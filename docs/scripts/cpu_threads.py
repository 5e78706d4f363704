"""ms per sampling step (16 DDIM steps, compiled step engine) of a run's one-pass student and two-pass
teacher at batch 1, 16, 64 and 256, with MindSpore's CPU kernel threads set to N (or its default).
MindSpore takes the thread count once per process, so run one process per setting (docs/sampling.md):

    python docs/scripts/cpu_threads.py outputs/digits default
    python docs/scripts/cpu_threads.py outputs/digits 1
"""
import sys
import time

import numpy as np
from hydra import compose, initialize_config_module

from distill.core import build, sampling
from distill.core.config import register
from distill.core.data import load_data
from distill.core.runtime import setup_from_config
from student.loading import load_student
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher


def main(run: str, threads: str) -> None:
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run}", f"cpu_threads={'null' if threads == 'default' else threads}"])
    setup_from_config(cfg)
    data = load_data(cfg.data)
    settings = build.sampler_settings(cfg)
    student, _ = load_student(cfg, data)
    teacher = load_teacher(cfg, data)
    predictors = {"student": sampling.jit_predictor(ConditionalPrediction(student.set_train(False))),
                  "teacher": sampling.jit_predictor(GuidedPrediction(teacher.set_train(False)))}
    for batch in (1, 16, 64, 256):
        noise = sampling.initial_noise(0, batch, data.image_shape)
        labels = np.arange(batch) % data.num_classes
        null = np.full(batch, data.num_classes)
        calls = {k: (lambda p=p: sampling.sample(p, noise, labels, 2.0, settings, null)) for k, p in predictors.items()}
        for _ in range(3):  # compile and warm
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(7 if batch < 256 else 3):  # interleaved
            for k, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1000 * float(np.median(v)) / settings.num_steps for k, v in times.items()}
        print(f"threads {threads} batch {batch}: student {ms['student']:.2f} ms/step, teacher {ms['teacher']:.2f} "
              f"ms/step, one pass vs two {ms['teacher'] / ms['student']:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits", sys.argv[2] if len(sys.argv) > 2 else "default")
