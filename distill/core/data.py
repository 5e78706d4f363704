"""Datasets as plain numpy arrays (N x C x H x W, float32 in [-1, 1]) and a deterministic batch stream.

Formats: scikit-learn's bundled digits (the embedded default, nothing downloaded), MNIST /
Fashion-MNIST IDX files, CIFAR-10 binary batches, and an image folder with one sub-folder per
class. Every bad input raises :class:`UserError` with a one-line message naming the path.
"""

from __future__ import annotations

import collections
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from distill.core.errors import UserError

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
    kind, magic, ndim = ("image", 2051, 3) if images else ("label", 2049, 1)
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise UserError(f"data: {path} is not an IDX {kind} file (magic {found}, expected {magic})")
    if len(raw) < header:
        raise UserError(f"data: {path} is truncated ({len(raw)} bytes, header needs {header})")
    dims = [int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(f"data: {path} has {len(raw)} bytes, expected {expected} for dims {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


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
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise UserError(f"data: {path} has {len(raw)} bytes, not a multiple of {CIFAR_RECORD} "
                        "(CIFAR-10 binary record size)")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int32)


def _load_cifar10(root: Path) -> tuple[Split, Optional[Split], Optional[tuple[str, ...]]]:
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    paths = [p for i in range(1, 6) if (p := root / f"data_batch_{i}.bin").is_file()]
    if not paths:
        raise UserError(f"data: missing file {root / 'data_batch_1.bin'} (expected CIFAR-10 binary "
                        f"batches data_batch_1.bin..data_batch_5.bin in {root})")
    parts = [_read_cifar_batch(p) for p in paths]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_batch(root / "test_batch.bin") if (root / "test_batch.bin").is_file() else None
    meta = root / "batches.meta.txt"
    names = tuple(s.strip() for s in meta.read_text().splitlines() if s.strip()) if meta.is_file() else None
    return train, test, names


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
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


def _load_folder(root: Path, size: Optional[int], channels: Optional[int] = None) -> tuple[Split, tuple[str, ...]]:
    """Images of ``root/<class>/``: one channel if every image is grayscale (or ``channels`` = 1), else RGB;
    uint16 if any image has 16 bits per channel (8-bit ones are scaled to match), else uint8."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data: no class sub-folders in {root} (expected {root}/<class>/*.png)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"data: class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
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


# ----------------------------------------------------------------------------- API


def load_data(cfg: Mapping[str, Any]) -> ImageData:
    """Load the dataset `cfg.name` as float32 arrays in [-1, 1] with a deterministic held-out split."""
    name = cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"data: unknown dataset '{name}' (choose {', '.join(DATASETS)})")
    size, fraction, seed, cap = _options(cfg)
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
                    start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless deterministic batches; step k is the same whatever `start_step` the stream began at.

    Epoch e is the permutation ``default_rng((seed, e))`` cut into full batches (the last partial
    batch is dropped). With fewer images than `batch_size`, each step is its own "epoch" that draws
    `batch_size` indices with replacement from ``default_rng((seed, step))``.
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
            for b in range(offset, per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                yield images[idx], labels[idx]
            epoch, offset = epoch + 1, 0

    return stream()


def step_batches(data: ImageData, batch_size: int, seed: int, start_step: int, *stream: int
                 ) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.random.Generator]]:
    """``step -> (x, y, rng)``: the next training batch (:func:`iterate_batches`) and the step's own
    generator ``default_rng((seed, *stream, step))`` for everything else the step draws (t, noise, w).

    ``stream`` keeps the objectives' draws apart (teacher, distillation, each progressive round), and
    drawing per step means a resumed run replays exactly the stream an uninterrupted run saw.
    """
    batches = iterate_batches(data.train_images, data.train_labels, batch_size, seed, start_step)

    def draw(step: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        x, y = next(batches)
        return x, y, np.random.default_rng((seed, *stream, step))

    return draw
