"""What the sampler-timing scripts of this folder share: a run's config and models opened with a CPU thread
count, a 16-step sampler call on fixed noise, and medians of interleaved calls. Imported by the scripts
(`python docs/scripts/<script>.py` puts this folder on the import path)."""
import time
from typing import Any, Callable

import numpy as np
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from distill.core import build, sampling
from distill.core.config import register
from distill.core.data import ImageData, load_data
from distill.core.runtime import setup_from_config
from student.loading import load_student
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher


def open_run(run: str, threads: str) -> tuple[DictConfig, ImageData, sampling.SamplerSettings]:
    """The config of the run folder ``run`` with MindSpore's CPU kernel threads set to ``threads`` ("default" =
    MindSpore's own; fixed once per process), its data and its sampler settings."""
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run}", f"cpu_threads={'null' if threads == 'default' else threads}"])
    setup_from_config(cfg)
    data = load_data(cfg.data)
    return cfg, data, build.sampler_settings(cfg)


def run_nets(cfg: DictConfig, data: ImageData) -> tuple[Any, Any]:
    """(stage-one student, teacher) of the run, in inference mode."""
    return load_student(cfg, data)[0].set_train(False), load_teacher(cfg, data).set_train(False)


def student_predictor(student: Any) -> sampling.Predictor:
    return sampling.jit_predictor(ConditionalPrediction(student))


def teacher_predictor(teacher: Any) -> sampling.Predictor:
    return sampling.jit_predictor(GuidedPrediction(teacher))


def sampler_call(predict: sampling.Predictor, batch: int, data: ImageData, settings: sampling.SamplerSettings
                 ) -> Callable[[], Any]:
    """A call that samples ``batch`` class-cycling images at w = 2 from fixed noise."""
    noise = sampling.initial_noise(0, batch, data.image_shape)
    labels = np.arange(batch) % data.num_classes
    null = np.full(batch, data.num_classes)
    return lambda: sampling.sample(predict, noise, labels, 2.0, settings, null)


def warm(calls: dict[str, Callable[[], Any]], times: int) -> dict[str, np.ndarray]:
    """Call each ``times`` times (the first compiles); the last outputs."""
    outs: dict[str, np.ndarray] = {}
    for _ in range(times):
        outs = {k: np.asarray(fn()) for k, fn in calls.items()}
    return outs


def ms_per_step(calls: dict[str, Callable[[], Any]], repeats: int, steps: int) -> dict[str, float]:
    """Median milliseconds per sampler step of each call over ``repeats`` interleaved rounds, the order rotating
    per round."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * float(np.median(v)) / steps for k, v in times.items()}
