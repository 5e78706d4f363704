"""Datasets as plain numpy arrays (N x C x H x W, float32 in [-1, 1]) and a deterministic batch stream.

Formats: scikit-learn's bundled digits (the embedded default, nothing downloaded), MNIST /
Fashion-MNIST IDX files, CIFAR-10 binary batches, and an image folder with one sub-folder per
class. Every bad input raises :class:`UserError` with a one-line message naming the path.
"""

from __future__ import annotations

import collections
import gzip
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from distill.core.errors import UserError
from distill.core.streaming import NativeSource, ReaderSource, RowSource, StreamedImages, native_layout_problem

log = logging.getLogger(__name__)
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")
CIFAR_RECORD = 1 + 3 * 32 * 32
Split = tuple[np.ndarray, np.ndarray]  # (uint8 images N x C x H x W, int labels N)


@dataclass(frozen=True)
class ImageData:
    train_images: np.ndarray  # float32, N x C x H x W, in [-1, 1]
    train_labels: np.ndarray  # int32, N
    test_images: np.ndarray   # held-out split, same layout
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- formats


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, bunch.target.astype(np.int32)


def _find(root: Path, name: str) -> Optional[Path]:
    """`root/name` or `root/name.gz`, whichever exists."""
    for path in (root / name, root / (name + ".gz")):
        if path.is_file():
            return path
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise UserError(f"data: cannot read {path} ({exc})") from exc


def _read_idx(path: Path, images: bool) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: images (magic 2051, N x rows x cols) or labels (2049, N)."""
    raw = _read_bytes(path)
    dims = _idx_dims(path, raw[:16], len(raw), images)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def _idx_dims(path: Path, head: bytes, total: int, images: bool) -> list[int]:
    """The dimensions in an IDX file's header (``head``: its first bytes), checked against its magic
    number and its size in bytes (``total``)."""
    kind, magic, ndim = ("image", 2051, 3) if images else ("label", 2049, 1)
    header = 4 + 4 * ndim
    found = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if found != magic:
        raise UserError(f"data: {path} is not an IDX {kind} file (magic {found}, expected {magic})")
    if total < header:
        raise UserError(f"data: {path} is truncated ({total} bytes, header needs {header})")
    dims = [int(d) for d in np.frombuffer(head, ">u4", ndim, 4)]
    expected = header + int(np.prod(dims))
    if total != expected:
        raise UserError(f"data: {path} has {total} bytes, expected {expected} for dims {dims}")
    return dims


def _read_idx_pair(root: Path, prefix: str, title: str) -> Split:
    paths = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = _find(root, name)
        if path is None:
            raise UserError(f"data: missing file {root / name} (expected {title} IDX files in {root})")
        paths.append(path)
    images, labels = _read_idx(paths[0], images=True), _read_idx(paths[1], images=False)
    _check_count(images, labels, paths[0], paths[1])
    return images[:, None], labels


def _load_idx(root: Path, title: str) -> tuple[Split, Optional[Split]]:
    """The train pair, and the t10k pair if either t10k file exists (else None: split by fraction)."""
    has_test = any(_find(root, f"t10k-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    return _read_idx_pair(root, "train", title), _read_idx_pair(root, "t10k", title) if has_test else None


def _read_cifar_batch(path: Path) -> Split:
    raw = _read_bytes(path)
    _check_cifar_size(path, len(raw))
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int32)


def _check_cifar_size(path: Path, size: int) -> None:
    if size == 0 or size % CIFAR_RECORD:
        raise UserError(f"data: {path} has {size} bytes, not a multiple of {CIFAR_RECORD} "
                        "(CIFAR-10 binary record size)")


def _cifar10_files(root: Path) -> tuple[Path, list[Path]]:
    """The folder holding the CIFAR-10 batches and its training batch files."""
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    paths = [p for i in range(1, 6) if (p := root / f"data_batch_{i}.bin").is_file()]
    if not paths:
        raise UserError(f"data: missing file {root / 'data_batch_1.bin'} (expected CIFAR-10 binary "
                        f"batches data_batch_1.bin..data_batch_5.bin in {root})")
    return root, paths


def _cifar10_names(root: Path) -> Optional[tuple[str, ...]]:
    meta = root / "batches.meta.txt"
    return tuple(s.strip() for s in meta.read_text().splitlines() if s.strip()) if meta.is_file() else None


def _load_cifar10(root: Path) -> tuple[Split, Optional[Split], Optional[tuple[str, ...]]]:
    root, paths = _cifar10_files(root)
    parts = [_read_cifar_batch(p) for p in paths]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_batch(root / "test_batch.bin") if (root / "test_batch.bin").is_file() else None
    return train, test, _cifar10_names(root)


def _open_image(path: Path, data: Optional[bytes] = None) -> Image.Image:
    """The decoded image of ``path`` (or of ``data``, that file's bytes)."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            return img
    except Exception as exc:  # Pillow raises several types for bad files
        raise UserError(f"data: cannot read image {path} ({type(exc).__name__}: {exc})") from exc


GRAY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _pixels(img: Image.Image, path: Path, channels: int, notes: collections.Counter[str]) -> np.ndarray:
    """One image as H x W x ``channels`` pixels: uint16 for 16-bit images, else uint8 (what was converted
    is counted in ``notes``)."""
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img)
        if a.min() < 0 or a.max() > 65535:
            raise UserError(f"data: {path} has pixel values {a.min()}..{a.max()}, outside the 16-bit range "
                            "0..65535; save it with 8 or 16 bits per channel")
        notes["16-bit"] += 1
        a = a.astype(np.uint16)[..., None]
    elif img.mode in ("F",) or img.mode.startswith(("I;32", "F;")):
        raise UserError(f"data: {path} has {img.mode} pixels (floating point or 32-bit); save it with 8 or 16 "
                        "bits per channel")
    elif img.mode in GRAY_MODES:
        if img.mode == "LA":
            notes["LA -> L (alpha dropped)"] += 1
        a = np.asarray(img.convert("L"))[..., None]
    else:
        if img.mode != "RGB":
            notes[f"{img.mode} -> RGB" + (" (alpha dropped)" if "A" in img.mode else "")] += 1
        a = np.asarray(img.convert("RGB"))
    if channels == 3 and a.shape[2] == 1:
        notes["grayscale repeated to 3 channels"] += 1
        a = np.repeat(a, 3, axis=2)
    elif channels == 1 and a.shape[2] == 3:
        notes["RGB -> grayscale"] += 1
        a = np.asarray(Image.fromarray(a).convert("L"))[..., None]
    return a


def _resize_pixels(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of H x W x C pixels (8-bit: Pillow on the image; 16-bit: Pillow float mode per channel)."""
    if a.shape[:2] == (size, size):
        return a
    if a.dtype == np.uint8:
        img = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img).reshape(size, size, a.shape[2])
    top = np.iinfo(a.dtype).max
    out = [np.asarray(Image.fromarray(a[..., c].astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
           for c in range(a.shape[2])]
    return np.clip(np.rint(np.stack(out, axis=2)), 0, top).astype(a.dtype)


def _folder_files(root: Path) -> tuple[list[Path], list[tuple[Path, int]]]:
    """The class sub-folders of ``root`` (sorted) and every image file with its label."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data: no class sub-folders in {root} (expected {root}/<class>/*.png)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"data: class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    return classes, files


def _load_folder(root: Path, size: Optional[int], channels: Optional[int] = None) -> tuple[Split, tuple[str, ...]]:
    """Images of ``root/<class>/``: one channel if every image is grayscale (or ``channels`` = 1), else RGB;
    uint16 if any image has 16 bits per channel (8-bit ones are scaled to match), else uint8."""
    classes, files = _folder_files(root)
    images = [_open_image(p) for p, _ in files]
    if channels is None:
        channels = 1 if all(img.mode in GRAY_MODES for img in images) else 3
    notes: collections.Counter[str] = collections.Counter()
    arrays = [_pixels(img, path, channels, notes) for img, (path, _) in zip(images, files)]
    if size is not None:
        arrays = [_resize_pixels(a, size) for a in arrays]
    for (path, _), a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            (h0, w0), (h, w) = arrays[0].shape[:2], a.shape[:2]
            raise UserError(f"data: images in {root} have different sizes ({files[0][0]} is {w0}x{h0}, "
                            f"{path} is {w}x{h}); set data.image_size to resize them all")
    if notes["16-bit"]:
        top = max(int(a.max()) for a in arrays if a.dtype == np.uint16)
        log.info("data: %d of %d images in %s have 16 bits per channel: scaled by the 16-bit range 0..65535 "
                 "(their largest value is %d)%s", notes["16-bit"], len(arrays), root, top,
                 "; 8-bit images scaled to match" if notes["16-bit"] < len(arrays) else "")
        if top < 4096:
            log.warning("data: the 16-bit images in %s use values up to %d only (12-bit data?): they will look dark",
                        root, top)
        arrays = [a if a.dtype == np.uint16 else a.astype(np.uint16) * 257 for a in arrays]
    for what, count in sorted(notes.items()):
        if what != "16-bit" and count:
            log.info("data: %d image(s) in %s converted: %s", count, root, what)
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)
    return (stacked, np.array([label for _, label in files], np.int32)), tuple(p.name for p in classes)


# ----------------------------------------------------------------------------- helpers


def _check_count(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if len(images) != len(labels):
        raise UserError(f"data: {image_path} has {len(images)} images but {label_path} has "
                        f"{len(labels)} labels")


def _to_unit(images: np.ndarray) -> np.ndarray:
    """Unsigned integer pixels -> float32 [-1, 1] by their type's range (uint8: 0 -> -1, 255 -> 1; uint16: 65535 -> 1)."""
    half = np.float32(np.iinfo(images.dtype).max / 2.0)
    return images.astype(np.float32) / half - np.float32(1.0)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (Pillow, float mode) of every channel of every image to size x size."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), np.float32)
    for i, j in np.ndindex(*images.shape[:2]):
        channel = Image.fromarray(np.ascontiguousarray(images[i, j], np.float32))  # mode "F"
        out[i, j] = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(out, -1.0, 1.0)


def _with_channels(images: np.ndarray, channels: Optional[int], where: Any) -> np.ndarray:
    """N x C x H x W in [-1, 1] with ``channels`` channels: grayscale repeated, or RGB to luminance (ITU-R 601)."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    log.info("data: %s converted from %d to %d channel(s) (data.channels=%d)", where, have, channels, channels)
    return _convert_channels(images, channels)


def _convert_channels(images: np.ndarray, channels: Optional[int]) -> np.ndarray:
    if channels is None or channels == images.shape[1]:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    weights = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)
    return (images * weights).sum(axis=1, keepdims=True).astype(np.float32)


def _split(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int, where: str) -> tuple[Split, Split]:
    n = len(images)
    if n < 2:
        raise UserError(f"data: {where} has {n} image(s); need at least 2 to hold some out")
    n_test = min(n - 1, max(1, int(round(n * fraction))))
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def _root(cfg: Mapping[str, Any], name: str) -> Path:
    if cfg.get("root") is None:
        raise UserError(f"data: data.root is required for dataset '{name}' (the folder with its files)")
    root = Path(str(cfg.get("root"))).expanduser()
    if not root.is_dir():
        raise UserError(f"data: root {root} is not a folder")
    return root


def _options(cfg: Mapping[str, Any]) -> tuple[Optional[int], float, int, Optional[int]]:
    size, fraction = cfg.get("image_size"), cfg.get("held_out_fraction", 0.2)
    seed, cap = cfg.get("split_seed", 0), cfg.get("max_train")
    if size is not None and not _is_int(size):
        raise UserError(f"data: image_size must be an integer >= 4 or null, not {size!r}")
    if size is not None and size < 4:
        raise UserError(f"data: image_size {size} is too small (need >= 4)")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise UserError(f"data: held_out_fraction {fraction!r} must be a number between 0 and 1 (exclusive)")
    if not _is_int(seed) or seed < 0:
        raise UserError(f"data: split_seed {seed!r} must be an integer >= 0")
    if cap is not None and (not _is_int(cap) or cap < 1):
        raise UserError(f"data: max_train {cap!r} must be an integer >= 1 or null")
    return size, float(fraction), seed, cap


def _channels(cfg: Mapping[str, Any]) -> Optional[int]:
    channels = cfg.get("channels")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"data: channels {channels!r} must be 1 (grayscale), 3 (RGB) or null (as the images are)")
    return channels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- streaming


def digest_source(images: Any) -> Any:
    """What identifies a set of images in a digest: the array, or a stream's files and read options
    (reading a whole stream to hash it would defeat streaming)."""
    return images.key if isinstance(images, StreamedImages) else images


def _streamed(cfg: Mapping[str, Any], name: str, size: Optional[int], fraction: float, seed: int,
              cap: Optional[int]) -> Optional[ImageData]:
    """The data set with its training images streamed from ``data.root`` (the held-out split is read
    into memory: the evaluation needs all of it); None when the files cannot be streamed
    (gzip-compressed IDX files are read into memory as without ``stream``, logged)."""
    root = _root(cfg, name)
    channels = _channels(cfg)
    test: Optional[Split] = None  # an official held-out split (CIFAR-10 test_batch.bin, MNIST t10k)
    if name == "folder":
        source, labels, names, key = _folder_source(root, size, channels)
    elif name == "cifar10":
        source, labels, test, meta, key = _cifar10_source(root, size, channels)
        names = meta or CIFAR10_NAMES
    else:
        title = "MNIST" if name == "mnist" else "Fashion-MNIST"
        found = _idx_source(root, title, size, channels)
        if found is None:
            log.info("data: the %s IDX files in %s are gzip-compressed: read into memory (gunzip them to "
                     "stream them)", title, root)
            return None
        source, labels, test, key = found
        names = DIGIT_NAMES if name == "mnist" else FASHION_NAMES
    if len(labels) == 0:
        raise UserError(f"data: {root} has no training images")
    train_ids, train_y = np.arange(len(labels)), np.asarray(labels, np.int32)
    test_ids: Optional[np.ndarray] = None
    if test is None:
        (train_ids, train_y), (test_ids, test_y) = _split(train_ids, train_y, fraction, seed, str(root))
    else:
        test_y = test[1]
    order = np.random.default_rng((seed, 1)).permutation(len(train_ids))[:cap]
    train_ids, train_y = train_ids[order], train_y[order]
    names = _class_names(cfg.get("class_names"), names, np.concatenate([train_y, test_y]), root)
    key += repr(("stream", size, channels)).encode()
    shape = tuple(source.read(int(train_ids[0])).shape)
    train = StreamedImages(source, train_ids, shape, key, _stream_workers(), str(root))
    if test_ids is not None:
        test_x = StreamedImages(source, test_ids, shape, key, _stream_workers(), str(root))[:]
    else:
        test_x = _to_unit(test[0])
        test_x = _convert_channels(_resize(test_x, size) if size is not None else test_x, channels)
    native = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}.get(name, channels)  # a folder's are decided above
    if channels is not None and channels != native:
        log.info("data: %s converted to %d channel(s) (data.channels=%d)", root, channels, channels)
    log.info("data: streaming %d training images from %s through %s (%d held out, in memory)", len(train), root,
             source.reader, len(test_x))
    return ImageData(train, train_y.astype(np.int32), np.ascontiguousarray(test_x, np.float32),
                     np.asarray(test_y, np.int32), names)


def _unit_image(size: Optional[int], channels: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    """C x H x W unsigned pixels -> float32 C x H x W in [-1, 1], resized and with ``channels``, by the
    functions the in-memory loader applies to the whole array (so the values are the same)."""
    def convert(pixels: np.ndarray) -> np.ndarray:
        x = _to_unit(pixels[None])
        if size is not None:
            x = _resize(x, size)
        return np.ascontiguousarray(_convert_channels(x, channels)[0], np.float32)
    return convert


def _row_source(kind: str, root: Path, files: Sequence[Path], labels: np.ndarray,
                convert: Callable[[np.ndarray], np.ndarray], read: Callable[[int], np.ndarray],
                problem: Optional[str], **native: Any) -> RowSource:
    """MindSpore's own source for ``kind`` when it reads ``root`` row for row as the project's reader
    does, else a pipeline over the project's reader (``read``); which one is logged."""
    source = NativeSource(kind, root, labels, convert, read, **native)
    if problem is None and kind == "folder" and source.size() != len(labels):
        problem = f"ImageFolderDataset lists {source.size()} images, the project's reader {len(labels)}"
    if problem is None:
        return source
    log.info("data: %s streams through the project's reader, not %s: %s", root, source.reader, problem)
    return ReaderSource(read)


def _folder_source(root: Path, size: Optional[int], channels: Optional[int]
                   ) -> tuple[RowSource, np.ndarray, tuple[str, ...], bytes]:
    """An image folder read one image at a time: the channel count, 16-bit scaling and size check
    come from every file's header (Pillow opens it without decoding), as the in-memory loader
    decides them from the decoded images. Decoding is Pillow's in both sources (the native one hands
    over the file's bytes), so 16-bit images and every mode convert as in memory."""
    classes, files = _folder_files(root)
    modes, sizes = [], []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                modes.append(img.mode)
                sizes.append(img.size)
        except Exception as exc:  # Pillow raises several types for bad files
            raise UserError(f"data: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
    if channels is None:
        channels = 1 if all(m in GRAY_MODES for m in modes) else 3
    if size is None:
        for (path, _), (w, h) in zip(files, sizes):
            if (w, h) != sizes[0]:
                w0, h0 = sizes[0]
                raise UserError(f"data: images in {root} have different sizes ({files[0][0]} is {w0}x{h0}, "
                                f"{path} is {w}x{h}); set data.image_size to resize them all")
    sixteen = sum(m in SIXTEEN_BIT_MODES for m in modes)
    if sixteen:
        log.info("data: %d of %d images in %s have 16 bits per channel: scaled by the 16-bit range 0..65535%s",
                 sixteen, len(files), root, "; 8-bit images scaled to match" if sixteen < len(files) else "")
    unit = _unit_image(None, None)  # a folder's images are resized and converted as pixels, as in memory

    def pixels(path: Path, data: Optional[bytes] = None) -> np.ndarray:
        a = _pixels(_open_image(path, data), path, channels, collections.Counter())
        if size is not None:
            a = _resize_pixels(a, size)
        if sixteen and a.dtype != np.uint16:
            a = a.astype(np.uint16) * 257
        return unit(a.transpose(2, 0, 1))

    labels = np.array([label for _, label in files], np.int32)
    paths = [p for p, _ in files]
    source = _row_source("folder", root, paths, labels, lambda raw: pixels(root, raw.tobytes()),
                         lambda i: pixels(paths[i]), None, classes=[p.name for p in classes],
                         extensions=[p.suffix for p in paths])
    return source, labels, tuple(p.name for p in classes), _file_key(paths)


def _cifar10_source(root: Path, size: Optional[int], channels: Optional[int]
                    ) -> tuple[RowSource, np.ndarray, Optional[Split], Optional[tuple[str, ...]], bytes]:
    """CIFAR-10 training records (the project's reader memory-maps them; the test batch and the labels in
    memory)."""
    root, paths = _cifar10_files(root)
    for path in paths:
        _check_cifar_size(path, path.stat().st_size)
    maps = [np.memmap(p, np.uint8, "r").reshape(-1, CIFAR_RECORD) for p in paths]
    starts = np.cumsum([0] + [len(m) for m in maps])
    labels = np.concatenate([np.asarray(m[:, 0]) for m in maps]).astype(np.int32)
    convert = _unit_image(size, channels)

    def read(i: int) -> np.ndarray:
        f = int(np.searchsorted(starts, i, side="right")) - 1
        return convert(np.asarray(maps[f][i - starts[f], 1:]).reshape(3, 32, 32))

    source = _row_source("cifar10", root, paths, labels, lambda hwc: convert(hwc.transpose(2, 0, 1)), read,
                         native_layout_problem("cifar10", root, paths))
    test = _read_cifar_batch(root / "test_batch.bin") if (root / "test_batch.bin").is_file() else None
    return source, labels, test, _cifar10_names(root), _file_key(paths)


def _idx_source(root: Path, title: str, size: Optional[int], channels: Optional[int]
                ) -> Optional[tuple[RowSource, np.ndarray, Optional[Split], bytes]]:
    """MNIST-format training images (the project's reader memory-maps them; labels and the t10k pair in
    memory); None if the image file is gzip-compressed."""
    paths = []
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        path = _find(root, name)
        if path is None:
            raise UserError(f"data: missing file {root / name} (expected {title} IDX files in {root})")
        paths.append(path)
    if paths[0].suffix == ".gz":
        return None
    with open(paths[0], "rb") as f:
        head = f.read(16)
    dims = _idx_dims(paths[0], head, paths[0].stat().st_size, images=True)
    images = np.memmap(paths[0], np.uint8, "r", offset=16, shape=tuple(dims))
    labels = _read_idx(paths[1], images=False).astype(np.int32)
    _check_count(images, labels, paths[0], paths[1])
    has_test = any(_find(root, f"t10k-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    test = _read_idx_pair(root, "t10k", title) if has_test else None
    convert = _unit_image(size, channels)
    source = _row_source("mnist", root, paths, labels, lambda hwc: convert(hwc.transpose(2, 0, 1)),
                         lambda i: convert(np.asarray(images[i])[None]),
                         native_layout_problem("mnist", root, paths, (dims[1], dims[2])))
    return source, labels, test, _file_key(paths)


def _stream_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _file_key(paths: Sequence[Path]) -> bytes:
    """Names, sizes and modification times of ``paths``: what identifies streamed files in a digest."""
    return "\n".join(f"{p.resolve()}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths).encode()


# ----------------------------------------------------------------------------- API


def load_data(cfg: Mapping[str, Any]) -> ImageData:
    """Load the dataset `cfg.name` as float32 arrays in [-1, 1] with a deterministic held-out split.

    With ``stream`` (file-based data sets) the training images stay on disk and are read batch by
    batch (:class:`StreamedImages`); the result is the same, image for image."""
    name = cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"data: unknown dataset '{name}' (choose {', '.join(DATASETS)})")
    size, fraction, seed, cap = _options(cfg)
    if cfg.get("stream") and name != "digits":  # the embedded digits always sit in memory
        streamed = _streamed(cfg, name, size, fraction, seed, cap)
        if streamed is not None:
            return streamed
    test: Optional[Split] = None
    if name == "digits":
        (train_x, train_y), names, where = _load_digits(), DIGIT_NAMES, "sklearn digits"
    else:
        root = where = _root(cfg, name)
        if name == "folder":
            train, names = _load_folder(root, size, _channels(cfg))
        elif name == "cifar10":
            train, test, meta = _load_cifar10(root)
            names = meta or CIFAR10_NAMES
        else:
            train, test = _load_idx(root, "MNIST" if name == "mnist" else "Fashion-MNIST")
            names = DIGIT_NAMES if name == "mnist" else FASHION_NAMES
        train_x, train_y = _to_unit(train[0]), train[1]
        test = None if test is None else (_to_unit(test[0]), test[1])
    if len(train_x) == 0:
        raise UserError(f"data: {where} has no training images")
    if test is None:
        (train_x, train_y), test = _split(train_x, train_y, fraction, seed, str(where))
    order = np.random.default_rng((seed, 1)).permutation(len(train_x))[:cap]
    train_x, train_y = train_x[order], train_y[order]
    names = _class_names(cfg.get("class_names"), names, np.concatenate([train_y, test[1]]), where)
    if size is not None:
        train_x, test = _resize(train_x, size), (_resize(test[0], size), test[1])
    channels = _channels(cfg)
    train_x, test = _with_channels(train_x, channels, where), (_with_channels(test[0], channels, where), test[1])
    return ImageData(np.ascontiguousarray(train_x, np.float32), train_y.astype(np.int32),
                     np.ascontiguousarray(test[0], np.float32), test[1].astype(np.int32), names)


def _class_names(override: Optional[Sequence[str]], default: tuple[str, ...],
                 labels: np.ndarray, where: Any) -> tuple[str, ...]:
    names = default if override is None else tuple(str(s) for s in override)
    top = int(labels.max()) if len(labels) else -1
    if top >= len(names):
        raise UserError(f"data: {where} has label {top} but only {len(names)} class names "
                        f"({', '.join(names)})")
    return names


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                    start_step: int = 0, share: Optional[tuple[int, int]] = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless deterministic batches; step k is the same whatever `start_step` the stream began at.

    Epoch e is the permutation ``default_rng((seed, e))`` cut into full batches (the last partial
    batch is dropped). With fewer images than `batch_size`, each step is its own "epoch" that draws
    `batch_size` indices with replacement from ``default_rng((seed, step))``.

    ``share`` = (rank, world size) under data parallelism: a stream then reads only this rank's rows of
    each global batch (the contiguous slice :func:`distill.core.runtime.shard` keeps) and leaves the
    other ranks' rows zero, so the ranks together read each batch once; arrays give whole batches.
    """
    n = len(images)
    if n != len(labels):
        raise UserError(f"data: {n} images but {len(labels)} labels")
    if n == 0 or batch_size < 1 or seed < 0 or start_step < 0:
        raise UserError(f"data: cannot batch {n} images with batch_size {batch_size}, "
                        f"seed {seed}, start_step {start_step} (all must be >= 1, >= 1, >= 0, >= 0)")
    per_epoch = max(1, n // batch_size)

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            rng = np.random.default_rng((seed, epoch))
            order = rng.permutation(n) if n >= batch_size else rng.integers(0, n, (1, batch_size))[0]
            rows = order[offset * batch_size:per_epoch * batch_size]
            for k, x in zip(range(0, len(rows), batch_size), _fetch_share(images, rows, batch_size, share)):
                yield x, labels[rows[k:k + batch_size]]
            epoch, offset = epoch + 1, 0

    return stream()


def fetch_rows(images: Any, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """``images[rows]`` in order, ``batch_size`` rows at a time: for a stream one read-ahead pipeline
    over all of them (a pipeline per batch would cost its start-up every batch)."""
    if isinstance(images, StreamedImages):
        return images.batches(rows, batch_size)
    return (images[rows[k:k + batch_size]] for k in range(0, len(rows), batch_size))


def _fetch_share(images: Any, rows: np.ndarray, batch_size: int, share: Optional[tuple[int, int]]
                 ) -> Iterator[np.ndarray]:
    """:func:`fetch_rows` of whole batches, or of this rank's slice of each (``share``, streams only)."""
    rank, world = share or (0, 1)
    if world == 1 or batch_size % world or not isinstance(images, StreamedImages):
        return fetch_rows(images, rows, batch_size)
    local = batch_size // world
    mine = slice(rank * local, (rank + 1) * local)

    def placed() -> Iterator[np.ndarray]:
        for part in images.batches(rows.reshape(-1, batch_size)[:, mine].reshape(-1), local):
            x = np.zeros((batch_size, *images.shape[1:]), np.float32)
            x[mine] = part
            yield x
    return placed()


def step_batches(data: ImageData, batch_size: int, seed: int, start_step: int, *stream: int,
                 share: Optional[tuple[int, int]] = None
                 ) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.random.Generator]]:
    """``step -> (x, y, rng)``: the next training batch (:func:`iterate_batches`) and the step's own
    generator ``default_rng((seed, *stream, step))`` for everything else the step draws (t, noise, w).

    ``stream`` keeps the objectives' draws apart (teacher, distillation, each progressive round), and
    drawing per step means a resumed run replays exactly the stream an uninterrupted run saw.
    ``share``: see :func:`iterate_batches` (for callers that train on this rank's slice only).
    """
    batches = iterate_batches(data.train_images, data.train_labels, batch_size, seed, start_step, share)

    def draw(step: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        x, y = next(batches)
        return x, y, np.random.default_rng((seed, *stream, step))

    return draw
