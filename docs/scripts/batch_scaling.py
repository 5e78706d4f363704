"""How far one pass can beat two at a batch size: the one-pass student's own time per 16-step sampler call at
batch B and 2B, beside the two-pass teacher's at B (which runs the same network on 2B images in one call). The
one-pass over two-pass ratio at batch B cannot exceed the student's time at 2B over its time at B, whatever
the sampler does around the network (docs/sampling.md). One process per thread setting:

    python docs/scripts/batch_scaling.py outputs/digits default
    python docs/scripts/batch_scaling.py outputs/digits 1
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

BATCHES = (16, 64)


def main(run: str, threads: str, repeats: int = 11) -> None:
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run}", f"cpu_threads={'null' if threads == 'default' else threads}"])
    setup_from_config(cfg)
    data = load_data(cfg.data)
    settings = build.sampler_settings(cfg)
    student, _ = load_student(cfg, data)
    student_step = sampling.jit_predictor(ConditionalPrediction(student.set_train(False)))
    teacher_step = sampling.jit_predictor(GuidedPrediction(load_teacher(cfg, data).set_train(False)))

    def call(predict, batch):
        noise = sampling.initial_noise(0, batch, data.image_shape)
        labels = np.arange(batch) % data.num_classes
        return lambda: sampling.sample(predict, noise, labels, 2.0, settings, np.full(batch, data.num_classes))

    calls = {}
    for b in BATCHES:
        calls[f"student_b{b}"], calls[f"student_b{2 * b}"] = call(student_step, b), call(student_step, 2 * b)
        calls[f"teacher_b{b}"] = call(teacher_step, b)
    for _ in range(2):  # compile and warm
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for r in range(repeats):  # interleaved, the order rotating
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1000 * float(np.median(v)) / settings.num_steps for k, v in times.items()}
    for b in BATCHES:
        print(f"threads {threads} batch {b}: student {ms[f'student_b{b}']:.2f} ms/step, at batch {2 * b} "
              f"{ms[f'student_b{2 * b}']:.2f}, teacher {ms[f'teacher_b{b}']:.2f}; one pass vs two "
              f"{ms[f'teacher_b{b}'] / ms[f'student_b{b}']:.2f}x, ceiling (student {2 * b} / {b}) "
              f"{ms[f'student_b{2 * b}'] / ms[f'student_b{b}']:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits", sys.argv[2] if len(sys.argv) > 2 else "default")
