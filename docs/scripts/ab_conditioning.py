"""Per-step time of the compiled `step` engine with the conditioning made per step (the engine of
commit 1c20352) and once per sampler call (today's), interleaved in one process, on a run's
teacher and student, 16 DDIM steps; docs/experiments.md.

    git show 1c20352:distill/core/sampling.py > old_sampling.py
    python docs/scripts/ab_conditioning.py 1,16,256 9 outputs/digits
"""
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import old_sampling as old  # noqa: E402
from distill.core import runtime  # noqa: E402
from distill.core import sampling as new  # noqa: E402
from distill.core.checkpoint import read_meta  # noqa: E402
from distill.core.weights import load_ema_weights  # noqa: E402
from teacher.guidance import ConditionalPrediction, GuidedPrediction  # noqa: E402
from teacher.unet import UNet, UNetConfig  # noqa: E402


def load(path: str) -> UNet:
    net = UNet(UNetConfig.from_dict(read_meta(path)["model"]))
    load_ema_weights(path, net)
    net.set_train(False)
    return net


def main(batches: list[int], repeats: int, run: str) -> None:
    runtime.setup_runtime("CPU", 0)
    student, teacher = load(f"{run}/student/checkpoint.safetensors"), load(f"{run}/teacher/checkpoint.safetensors")
    for b in batches:
        noise = np.random.default_rng(0).standard_normal((b, 1, 8, 8)).astype(np.float32)
        labels, null = np.arange(b) % 10, np.full(b, 10)
        entries = {}
        for name, cell in (("student", ConditionalPrediction(student)), ("teacher", GuidedPrediction(teacher))):
            entries[f"{name} per-step"] = (old.sample, old.jit_predictor(cell), old.SamplerSettings(num_steps=16))
            entries[f"{name} once"] = (new.sample, new.jit_predictor(cell), new.SamplerSettings(num_steps=16))
        images = {}
        for key, (run_sampler, predict, settings) in entries.items():
            for _ in range(3):  # compile and warm up
                images[key] = run_sampler(predict, noise, labels, 2.0, settings, null)
        for name in ("student", "teacher"):
            diff = np.abs(images[f"{name} once"] - images[f"{name} per-step"]).max()
            print(f"batch {b}: {name} max |diff| {diff:.1e}")
        times: dict[str, list[float]] = {k: [] for k in entries}
        keys, calls = list(entries), 3 if b < 64 else 1
        for r in range(repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # the order rotates per repeat
                run_sampler, predict, settings = entries[key]
                t0 = time.perf_counter()
                for _ in range(calls):
                    run_sampler(predict, noise, labels, 2.0, settings, null)
                times[key].append((time.perf_counter() - t0) / calls / 16 * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} ms/step" for k, v in med.items()))
        print(f"batch {b}: speed-up student {med['student per-step'] / med['student once']:.2f}x, "
              f"teacher {med['teacher per-step'] / med['teacher once']:.2f}x", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1].split(",")], int(sys.argv[2]), sys.argv[3])
