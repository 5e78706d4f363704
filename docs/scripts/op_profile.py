"""Share of each MindSpore operator type in the default backbone's compiled forward pass (sampling) or
forward + backward pass (training), from MindSpore's profiler on CPU (docs/sampling.md):

    python docs/scripts/op_profile.py forward 256
    python docs/scripts/op_profile.py train 128
"""
import csv
import sys
from pathlib import Path
import tempfile

import numpy as np
import mindspore as ms
from hydra import compose, initialize_config_module

from distill.core.config import register
from distill.core.data import load_data
from distill.core.runtime import setup_from_config
from teacher.loading import unet_config
from teacher.unet import UNet


def main(mode: str, batch: int) -> None:
    register()
    with initialize_config_module("distill.conf", version_base="1.3"):
        cfg = compose("config")
    setup_from_config(cfg)
    data = load_data(cfg.data)
    net = UNet(unet_config(cfg.model, data))
    net.set_train(mode == "train")
    rng = np.random.default_rng(0)
    args = (ms.Tensor(rng.standard_normal((batch, *data.image_shape)).astype(np.float32)),
            ms.Tensor(rng.uniform(size=batch).astype(np.float32)),
            ms.Tensor((np.arange(batch) % data.num_classes).astype(np.int32)),
            ms.Tensor(np.ones(batch, np.float32)), ms.Tensor(np.full(batch, data.num_classes, np.int32)))

    def loss(x, t, y, w, y_neg):
        return (net(x, t, y, w, y_neg) ** 2).mean()

    grad = ms.value_and_grad(loss, None, net.trainable_params())

    @ms.jit
    def forward(x, t, y, w, y_neg):
        return net(x, t, y, w, y_neg)

    @ms.jit
    def train(x, t, y, w, y_neg):
        return grad(x, t, y, w, y_neg)  # the loss and every gradient (unused outputs would be pruned)

    def call() -> None:
        out = train(*args) if mode == "train" else forward(*args)
        ms.Tensor(out[0] if mode == "train" else out).asnumpy()

    for _ in range(3):
        call()
    out = Path(tempfile.mkdtemp(prefix="op_profile_"))
    prof = ms.Profiler(output_path=str(out))
    for _ in range(10):
        call()
    prof.analyse()
    (table,) = out.glob("*/FRAMEWORK/cpu_op_type_info_0.csv")
    rows = sorted(csv.DictReader(table.open()), key=lambda r: -float(r["total_compute_time"]))
    total = sum(float(r["total_compute_time"]) for r in rows)
    print(f"{mode}, batch {batch}: {total / 10:.1f} ms of operator time per call")
    for r in rows[:8]:
        print(f"  {r['op_type']:<22} {100 * float(r['total_compute_time']) / total:5.1f}%  "
              f"{float(r['avg_time(ms)']):.3f} ms per launch")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "forward", int(sys.argv[2]) if len(sys.argv) > 2 else 256)
