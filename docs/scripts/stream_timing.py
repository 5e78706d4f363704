"""Time ``data.stream=true`` against the in-memory loader on generated files (README, Data).

Writes, once, into FOLDER: an image folder (10 classes x 300 random 32x32 RGB PNGs), MNIST-format IDX files
(60,000 random 28x28 training images, 1,000 t10k) and one official-size CIFAR-10 batch (10,000 records,
1,000 test). Then, one child process per data set and reader (so each peak memory is its own), it loads the
data set and reads two epochs of the seeded batch stream at batch 128:

    python docs/scripts/stream_timing.py /tmp/stream_timing
    python docs/scripts/stream_timing.py /tmp/stream_timing 240000   # MNIST files of 240,000 images instead

(the second form times the MNIST rows alone: the native source's memory grows with the file, the reader's not).

Readers: ``memory`` (data.stream=false), ``native`` (MindSpore's ImageFolderDataset / MnistDataset /
Cifar10Dataset, the default of data.stream=true for these layouts) and ``reader`` (data.stream=true forced
through the GeneratorDataset over the project's own reader). Printed per row: seconds to load, to the first
batch, for epoch 1 and epoch 2, and the process's peak resident memory (and what it grew by after the
imports).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 128
KINDS = {"folder": "folder", "mnist": "mnist", "cifar10": "cifar10"}


def make_data(root: Path, mnist_train: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "folder"
    if not folder.is_dir():
        for c in range(10):
            (folder / f"class_{c}").mkdir(parents=True)
            for i in range(300):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"class_{c}" / f"{i}.png")
    mnist = root / mnist_folder(mnist_train)
    if not mnist.is_dir():
        mnist.mkdir(parents=True)
        for prefix, n in (("train", mnist_train), ("t10k", 1000)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
            for name, array, magic in ((f"{prefix}-images-idx3-ubyte", images, 2051),
                                       (f"{prefix}-labels-idx1-ubyte", labels, 2049)):
                head = magic.to_bytes(4, "big") + np.array(array.shape, ">u4").tobytes()
                (mnist / name).write_bytes(head + array.tobytes())
    cifar = root / "cifar10"
    if not cifar.is_dir():
        cifar.mkdir(parents=True)
        for name, n in (("data_batch_1.bin", 10000), ("test_batch.bin", 1000)):
            records = np.concatenate([(np.arange(n) % 10).astype(np.uint8)[:, None],
                                      rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)], axis=1)
            (cifar / name).write_bytes(records.tobytes())


def mnist_folder(train: int) -> str:
    return "mnist" if train == 60000 else f"mnist_{train}"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def one(root: Path, kind: str, reader: str, folder: str) -> dict:
    """Load ``kind`` with ``reader`` and read two epochs; the timings and memory as a dict."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore  # noqa: F401  (imported before the baseline, as in a run)
    from omegaconf import OmegaConf

    from distill.core import data as data_module
    from distill.core.data import iterate_batches, load_data

    if reader == "reader":  # as if the native source could not read the layout
        native = data_module._row_source
        data_module._row_source = lambda kind, root, files, labels, convert, read, problem, **kw: native(
            kind, root, files, labels, convert, read, "forced by the timing script", **kw)
    cfg = OmegaConf.create(dict(name=KINDS[kind], root=str(root / folder), image_size=None, held_out_fraction=0.2,
                                split_seed=0, max_train=None, class_names=None, channels=None,
                                stream=reader != "memory"))
    base = peak_mb()
    t0 = time.perf_counter()
    data = load_data(cfg)
    t_load = time.perf_counter() - t0
    source = getattr(data.train_images, "source", None)
    per_epoch = len(data.train_images) // BATCH
    batches = iterate_batches(data.train_images, data.train_labels, BATCH, 0)
    t0 = time.perf_counter()
    next(batches)
    t_first = time.perf_counter() - t0
    for _ in range(per_epoch - 1):
        next(batches)
    t_epoch1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(per_epoch):
        x, _ = next(batches)
    t_epoch2 = time.perf_counter() - t0
    return dict(kind=kind, reader=reader, source=type(source).__name__ if source else "array",
                train=len(data.train_images), shape=list(x.shape[1:]), load_s=round(t_load, 2),
                first_batch_s=round(t_first, 3), epoch1_s=round(t_epoch1, 2), epoch2_s=round(t_epoch2, 2),
                peak_mb=round(peak_mb()), grew_mb=round(peak_mb() - base))


def main(root: Path, mnist_train: int) -> None:
    make_data(root, mnist_train)
    print(f"{'data':8} {'reader':7} {'source':13} {'train':>6} {'load s':>7} {'1st batch s':>11} "
          f"{'epoch 1 s':>9} {'epoch 2 s':>9} {'peak MB':>8} {'grew MB':>8}")
    for kind in KINDS if mnist_train == 60000 else ["mnist"]:
        folder = mnist_folder(mnist_train) if kind == "mnist" else kind
        for reader in ("memory", "native", "reader"):
            out = subprocess.run([sys.executable, __file__, str(root), kind, reader, folder], capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['kind']:8} {r['reader']:7} {r['source']:13} {r['train']:>6} {r['load_s']:>7} "
                  f"{r['first_batch_s']:>11} {r['epoch1_s']:>9} {r['epoch2_s']:>9} {r['peak_mb']:>8} "
                  f"{r['grew_mb']:>8}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5:
        print(json.dumps(one(Path(sys.argv[1]), *sys.argv[2:])))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 60000)
