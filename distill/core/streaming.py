"""Training images read batch by batch through ``mindspore.dataset`` pipelines (``data.stream=true``).

A stream's rows come from a :class:`RowSource`: :class:`NativeSource` is one of MindSpore's own
sources (``MnistDataset``, ``Cifar10Dataset``, ``ImageFolderDataset``) with a ``SubsetSampler`` of the
source indices in the project's seeded order and the conversion to float32 [-1, 1] as a parallel
``map``; :class:`ReaderSource` is a ``GeneratorDataset`` over the project's own reader, used for the
layouts the native sources cannot read as the project does and for MNIST / CIFAR-10 training files too
large to hold in memory (:func:`native_layout_problem`).
Either way the conversion functions are the in-memory loader's, so the values are the same bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from distill.core.errors import UserError

log = logging.getLogger(__name__)
CIFAR10_BATCH_RECORDS = 10000  # MindSpore's Cifar10Dataset reads exactly this many records per data_batch file
MNIST_SIDE = 28                 # ... and MnistDataset only 28 x 28 images
ERROR_SCAN_BATCHES = 32         # how far past the last good batch a failed pipeline's bad row is looked for
# MnistDataset and Cifar10Dataset parse the whole training files into memory when a pipeline starts (1.5-2.3x
# the files' size, measured: README, Data); above this many bytes of training files the project's own reader,
# which memory-maps them, streams them instead
NATIVE_MAX_BYTES = 1 << 30


class RowSource:
    """Where a stream's rows come from. ``read(i)``: source image i through the project's own reader
    (float32 C x H x W in [-1, 1]); :meth:`dataset`: a pipeline whose first column is that image for each
    of ``ids`` in order."""

    reader = ""

    def __init__(self, read: Callable[[int], np.ndarray]) -> None:
        self.read = read

    def dataset(self, ids: np.ndarray, workers: int) -> Any:
        raise NotImplementedError

    def check(self, ids: np.ndarray, columns: Sequence[np.ndarray]) -> None:
        """Called with each batch's source ids and its columns after the image."""


class ReaderSource(RowSource):
    """A ``GeneratorDataset`` over ``read`` (random access), decoded by worker threads."""

    reader = "the project's reader (GeneratorDataset)"

    def dataset(self, ids: np.ndarray, workers: int) -> Any:
        import mindspore.dataset as mds

        return mds.GeneratorDataset(_Rows(self.read, ids), column_names=["image"], shuffle=False,
                                    num_parallel_workers=workers, python_multiprocessing=False)


class _Rows:
    """Row k of a ``GeneratorDataset`` is source image ``ids[k]``."""

    def __init__(self, read: Callable[[int], np.ndarray], ids: np.ndarray) -> None:
        self.read, self.ids = read, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> tuple[np.ndarray]:
        return (self.read(int(self.ids[k])),)


class NativeSource(RowSource):
    """MindSpore's source for ``kind`` (mnist | cifar10 | folder) over ``root``, sampled by a
    ``SubsetSampler`` of the requested ids; ``convert`` (the image column of one row -> float32
    C x H x W) runs as a ``map`` on worker threads. ``labels`` are the project's labels of the source
    rows: every batch's label column must equal them, or the source orders its rows differently."""

    def __init__(self, kind: str, root: Path, labels: np.ndarray, convert: Callable[[np.ndarray], np.ndarray],
                 read: Callable[[int], np.ndarray], classes: Sequence[str] = (), extensions: Sequence[str] = ()
                 ) -> None:
        super().__init__(read)
        self.kind, self.root, self.labels, self.convert = kind, root, labels, convert
        self.classes, self.extensions = tuple(classes), sorted(set(extensions))
        self.reader = f"mindspore.dataset.{_SOURCES[kind]}"

    def dataset(self, ids: np.ndarray, workers: int) -> Any:
        import mindspore.dataset as mds

        dataset = self._source(mds, sampler=mds.SubsetSampler(ids.tolist()), num_parallel_workers=workers)
        return dataset.map(operations=[self.convert], input_columns=["image"], num_parallel_workers=workers,
                           python_multiprocessing=False)

    def size(self) -> int:
        """How many rows the native source lists (with no sampler)."""
        import mindspore.dataset as mds

        return int(self._source(mds, num_parallel_workers=1).get_dataset_size())

    def _source(self, mds: Any, **options: Any) -> Any:
        if self.kind == "folder":
            return mds.ImageFolderDataset(str(self.root), extensions=self.extensions, decode=False,
                                          class_indexing={c: i for i, c in enumerate(self.classes)}, **options)
        cls = mds.MnistDataset if self.kind == "mnist" else mds.Cifar10Dataset
        return cls(str(self.root), usage="train", **options)

    def check(self, ids: np.ndarray, columns: Sequence[np.ndarray]) -> None:
        got, expected = np.asarray(columns[0]).astype(np.int64), self.labels[ids].astype(np.int64)
        if not np.array_equal(got, expected):
            k = int(np.flatnonzero(got != expected)[0])
            raise UserError(f"data: {self.reader} orders the files in {self.root} differently from the project's "
                            f"reader (source row {ids[k]} has label {got[k]}, expected {expected[k]}); "
                            "set data.stream=false")


_SOURCES = {"mnist": "MnistDataset", "cifar10": "Cifar10Dataset", "folder": "ImageFolderDataset"}


def native_layout_problem(kind: str, root: Path, files: Sequence[Path], image_hw: tuple[int, int] = (0, 0)
                          ) -> Optional[str]:
    """Why MindSpore's source for ``kind`` would not read the project's training ``files`` in ``root``
    (row for row, in the same order), or None when it would.

    MnistDataset reads every file in ``root`` whose name has ``train-images`` and ``idx3-ubyte`` (and
    the labels alike), uncompressed, of 28 x 28 images only; Cifar10Dataset every file whose name has
    ``data_batch``, 10,000 records each. Both hold the whole files in memory, so training files larger
    than ``NATIVE_MAX_BYTES`` go through the project's reader. The folder's listing is compared with the
    native count by the caller (:meth:`NativeSource.size`)."""
    names = sorted(p.name for p in root.iterdir())
    total = sum(p.stat().st_size for p in files)
    if kind in ("mnist", "cifar10") and total > NATIVE_MAX_BYTES:
        return (f"its training files hold {total / 2**20:.0f} MB and {_SOURCES[kind]} would read them whole into "
                f"memory (the project's reader memory-maps them; the limit is {NATIVE_MAX_BYTES / 2**20:.0f} MB)")
    if kind == "mnist":
        if image_hw != (MNIST_SIDE, MNIST_SIDE):
            return f"its images are {image_hw[0]}x{image_hw[1]}, MnistDataset reads 28x28 only"
        for (prefix, suffix), mine in zip((("train-images", "idx3-ubyte"), ("train-labels", "idx1-ubyte")), files):
            seen = [n for n in names if prefix in n and suffix in n]
            if seen != [mine.name]:
                return f"MnistDataset would read {', '.join(seen)} (needs exactly {mine.name})"
    elif kind == "cifar10":
        seen = [n for n in names if "data_batch" in n]
        if seen != sorted(p.name for p in files):
            return f"Cifar10Dataset would read {', '.join(seen)} (the training batches are {', '.join(p.name for p in files)})"
        for path in files:
            records = path.stat().st_size // (1 + 3 * 32 * 32)
            if records != CIFAR10_BATCH_RECORDS:
                return f"{path.name} has {records} records, Cifar10Dataset reads {CIFAR10_BATCH_RECORDS} per batch file"
    return None


class StreamedImages:
    """Training images that stay in their files: ``len``, ``shape``, ``images[idx]`` (a float32 batch)
    and :meth:`batches` (the batches of an index order, read ahead).

    Reading goes through a ``mindspore.dataset`` pipeline from ``source`` on ``workers`` threads, batched
    in order. Only the source indices of the training images (``ids``, after the split and
    ``max_train``) are held in memory.
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, source: RowSource, ids: np.ndarray, image_shape: tuple[int, ...], key: bytes, workers: int,
                 where: str) -> None:
        self.source, self.ids, self.workers, self.where = source, np.asarray(ids, np.int64), int(workers), where
        self.shape = (len(self.ids), *image_shape)
        self.key = key  # what identifies the content for digests: the files and the read options

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: Any) -> np.ndarray:
        rows = np.atleast_1d(np.arange(len(self.ids))[idx])
        return next(self.batches(rows, max(1, len(rows)))) if len(rows) else np.zeros((0, *self.shape[1:]), np.float32)

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """The images at positions ``rows`` (of the training set) in order, ``batch_size`` at a time."""
        ids = self.ids[np.asarray(rows, np.int64)]
        dataset = self.source.dataset(ids, max(1, min(self.workers, len(ids)))).batch(batch_size, drop_remainder=False)
        done = 0
        try:
            for x, *columns in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1):
                self.source.check(ids[done:done + len(x)], columns)
                done += len(x)
                yield x
        except RuntimeError as e:  # a row's error comes wrapped in the pipeline's report
            raise self._culprit(e, ids[done:done + ERROR_SCAN_BATCHES * batch_size]) from None

    def _culprit(self, error: RuntimeError, ids: np.ndarray) -> UserError:
        """The project reader's own one-line error for the first of ``ids`` it cannot read (the rows the
        pipeline may have failed on), else the pipeline's message on one line."""
        for i in ids:
            try:
                self.source.read(int(i))
            except UserError as e:
                return e
        return UserError(f"data: reading {self.where} through {self.source.reader} failed ({_pipeline_message(error)})")


def _pipeline_message(error: RuntimeError) -> str:
    """The line of a ``mindspore.dataset`` error report that says what went wrong."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip() and not s.strip().startswith("-")]
    for s in lines:
        if s.startswith("[ERROR]"):
            return s[len("[ERROR]"):].strip()
    return lines[0] if lines else type(error).__name__
