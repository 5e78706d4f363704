"""Datasets as plain numpy arrays (N x C x H x W, float32 in [-1, 1]) and a deterministic batch stream.

Formats: scikit-learn's bundled digits (the embedded default, nothing downloaded), MNIST /
Fashion-MNIST IDX files, CIFAR-10 binary batches, and an image folder with one sub-folder per
class. Every bad input raises :class:`UserError` with a one-line message naming the path.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from distill.core.errors import UserError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
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


def _load_folder(root: Path, size: Optional[int]) -> tuple[Split, tuple[str, ...]]:
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
    mode = "L" if all(img.mode in ("1", "L", "LA") for img in images) else "RGB"
    images = [img.convert(mode) for img in images]
    if size is not None:
        images = [img.resize((size, size), Image.Resampling.BILINEAR) for img in images]
    for (path, _), img in zip(files, images):
        if img.size != images[0].size:
            (w0, h0), (w, h) = images[0].size, img.size
            raise UserError(f"data: images in {root} have different sizes ({files[0][0]} is {w0}x{h0}, "
                            f"{path} is {w}x{h}); set data.image_size to resize them all")
    arrays = [np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], -1) for img in images]
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)
    return (stacked, np.array([label for _, label in files], np.int32)), tuple(p.name for p in classes)


# ----------------------------------------------------------------------------- helpers


def _check_count(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if len(images) != len(labels):
        raise UserError(f"data: {image_path} has {len(images)} images but {label_path} has "
                        f"{len(labels)} labels")


def _to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (Pillow, float mode) of every channel of every image to size x size."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), np.float32)
    for i, j in np.ndindex(*images.shape[:2]):
        channel = Image.fromarray(np.ascontiguousarray(images[i, j], np.float32))  # mode "F"
        out[i, j] = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(out, -1.0, 1.0)


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
            train, names = _load_folder(root, size)
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
