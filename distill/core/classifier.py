"""The evaluation classifier: features for the Frechet distance and class accuracy of samples.

A small CNN trained on the same data as the diffusion models. It is cached as a
safetensors file plus a JSON sidecar (``<path>.json``) holding its config, a data
fingerprint and its held-out accuracy, so every evaluation uses the same yardstick.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from distill.core.data import StreamedImages, digest_source, fetch_rows
from distill.core.errors import UserError
from distill.core.fileio import atomic_write, digest, write_json
from distill.core.metrics import accuracy

log = logging.getLogger(__name__)


class ClassifierData(Protocol):
    """What ``load_or_train_classifier`` needs from a dataset (images N x C x H x W in [-1, 1])."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, pad_mode="pad", padding=1, has_bias=True)


class EvalClassifier(nn.Cell):
    """conv(w) -> conv(2w, stride 2) -> conv(2w) -> global average pool -> dense(feature_dim) -> dense(classes).

    ``construct`` returns ``(logits, features)``; features are the ReLU'd
    ``feature_dim``-d penultimate layer used for the Frechet distance.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.SequentialCell(
            _conv(in_channels, width),
            nn.ReLU(),
            _conv(width, 2 * width, stride=2),
            nn.ReLU(),
            _conv(2 * width, 2 * width),
            nn.ReLU(),
        )
        self.feature = nn.Dense(2 * width, feature_dim)
        self.head = nn.Dense(feature_dim, num_classes)
        self.relu = nn.ReLU()
        self.config: dict[str, int] = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "width": int(width),
            "feature_dim": int(feature_dim),
        }
        self.heldout_accuracy = float("nan")

    def construct(self, x: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        h = self.body(x).mean(axis=(2, 3))
        features = self.relu(self.feature(h))
        return self.head(features), features


def _init_params(net: nn.Cell, seed: int) -> None:
    """He-normal weights and zero biases from a numpy RNG: reproducible without touching global seeds."""
    rng = np.random.default_rng(seed)
    for p in net.trainable_params():
        shape = tuple(p.shape)
        if p.name.endswith("bias"):
            value = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        p.set_data(ms.Tensor(value))


def _augment(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Random translation by up to ``max_shift`` pixels, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)), constant_values=-1.0)
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    augment_shift: int | None = None,
) -> EvalClassifier:
    """Train an ``EvalClassifier`` with Adam on cross-entropy (jitted functional train step).

    Batches are drawn from reshuffled epochs with a fixed batch size (one compiled
    graph). ``augment_shift`` > 0 adds random translations of up to that many pixels;
    the default is H // 16 (none on 8x8 digits, where a 1-pixel shift cost accuracy;
    1 pixel at 16..31, 2 at 32x32).
    """
    if not isinstance(images, StreamedImages):  # a stream is read batch by batch below
        images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise UserError(f"classifier training needs N x C x H x W images with N labels; got {images.shape} and {labels.shape}")
    n = images.shape[0]
    batch_size = min(int(batch_size), n)
    if augment_shift is None:
        augment_shift = images.shape[2] // 16

    net = EvalClassifier(images.shape[1], num_classes, width=width)
    _init_params(net, seed)
    opt = nn.Adam(net.trainable_params(), learning_rate=lr)

    def loss_fn(x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        logits, _ = net(x)
        return ops.cross_entropy(logits, y)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def train_step(x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        loss, grads = grad_fn(x, y)
        opt(grads)
        return loss

    net.set_train(True)
    rng = np.random.default_rng(seed)

    def epochs() -> Any:
        """Each epoch a permutation drawn when it starts, cut into full batches (read ahead for a stream)."""
        while True:
            order = rng.permutation(n)
            rows = order[: n // batch_size * batch_size]
            for k, x in zip(range(0, len(rows), batch_size), fetch_rows(images, rows, batch_size)):
                yield x, labels[rows[k : k + batch_size]]

    loss = float("nan")
    for step, (x, y) in zip(range(int(steps)), epochs()):
        if augment_shift > 0:
            x = _augment(x, rng, augment_shift)
        loss = float(train_step(ms.Tensor(x), ms.Tensor(y)).asnumpy())
        if (step + 1) % 100 == 0:
            log.debug("eval classifier step %d/%d loss %.4f", step + 1, steps, loss)
    net.set_train(False)
    return net


def features_and_probabilities(
    clf: EvalClassifier, images: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N x feature_dim, float32) and class probabilities (N x num_classes, float64)."""
    images = np.asarray(images, np.float32)
    clf.set_train(False)
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        out, f = clf(ms.Tensor(images[start : start + batch_size]))
        feats.append(f.asnumpy())
        logits.append(out.asnumpy().astype(np.float64))
    if not feats:
        return np.zeros((0, clf.config["feature_dim"]), np.float32), np.zeros((0, clf.config["num_classes"]))
    z = np.concatenate(logits)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return np.concatenate(feats).astype(np.float32), p / p.sum(axis=1, keepdims=True)


def features_and_predictions(
    clf: EvalClassifier, images: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N x feature_dim, float32) and predicted classes (N, int64)."""
    feats, probs = features_and_probabilities(clf, images, batch_size)
    return feats, probs.argmax(axis=1).astype(np.int64)


def classifier_accuracy(
    clf: EvalClassifier, images: np.ndarray | None = None, labels: np.ndarray | None = None
) -> float:
    """Accuracy of ``clf`` on (images, labels); without them, the stored held-out accuracy."""
    if images is None or labels is None:
        return float(clf.heldout_accuracy)
    return accuracy(features_and_predictions(clf, images)[1], np.asarray(labels))


def _fingerprint(data: ClassifierData) -> str:
    """Short hash of the training images and labels: a cached classifier must match its data."""
    return digest(_as_float32(digest_source(data.train_images)), np.asarray(data.train_labels, np.int64))[:16]


def _as_float32(part: Any) -> Any:
    return part if isinstance(part, bytes) else np.asarray(part, np.float32)


def _data_desc(shape: Any, num_classes: int, n_train: int, fingerprint: str) -> str:
    return (
        f"{'x'.join(str(int(s)) for s in shape)} images, {int(num_classes)} classes, "
        f"{int(n_train)} training images (fingerprint {fingerprint})"
    )


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_or_train_classifier(
    path: str | Path, data: ClassifierData, steps: int = 300, batch_size: int = 128, seed: int = 0,
    min_accuracy: float = 0.0,
) -> EvalClassifier:
    """Load the cached classifier at ``path`` if it fits ``data`` and was trained with these settings, else
    train it and cache it; refuse one whose held-out accuracy is below ``min_accuracy``.

    The cache is ``path`` (safetensors weights) plus ``path.json`` (config, data fingerprint, training
    settings, held-out accuracy). A cache made for other data raises ``UserError``; one made with other
    training settings (steps, batch, seed) is trained again, so a changed setting is never ignored. A
    classifier below ``min_accuracy`` would judge samples by chance: it is refused, and not cached.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"eval classifier path {path} must end in .safetensors")
    if not isinstance(min_accuracy, (int, float)) or isinstance(min_accuracy, bool) or not 0 <= min_accuracy <= 1:
        raise UserError(f"eval classifier: min_accuracy {min_accuracy!r} must be a number in [0, 1]")
    shape = tuple(int(s) for s in data.image_shape)
    fingerprint = _fingerprint(data)
    want = _data_desc(shape, data.num_classes, len(data.train_labels), fingerprint)
    settings = {"steps": int(steps), "batch_size": int(batch_size), "seed": int(seed)}

    if path.exists():
        net = _load_cached(path, data, want, settings)
        if net is not None:
            return _good_enough(net, path, min_accuracy, steps)
        path.unlink()  # the weights mark a complete cache: gone before the sidecar changes

    t0 = time.perf_counter()
    net = train_classifier(
        data.train_images, data.train_labels, data.num_classes, steps=steps, batch_size=batch_size, seed=seed
    )
    seconds = time.perf_counter() - t0
    net.heldout_accuracy = classifier_accuracy(net, data.test_images, data.test_labels)
    log.info("trained eval classifier in %.1f s, held-out accuracy %.4f", seconds, net.heldout_accuracy)
    _good_enough(net, path, min_accuracy, steps)

    meta = {
        **net.config,
        "image_shape": list(shape),
        "n_train": int(len(data.train_labels)),
        "fingerprint": fingerprint,
        "train": settings,
        "heldout_accuracy": net.heldout_accuracy,
        "n_test": int(len(data.test_labels)),
        "train_seconds": round(seconds, 2),
    }
    # Sidecar first: the weights file is the "cache exists" marker.
    write_json(_sidecar(path), meta)
    atomic_write(path, lambda t: ms.save_checkpoint(net, t, format="safetensors"), ".safetensors")
    return net


def _good_enough(net: EvalClassifier, path: Path, min_accuracy: float, steps: int) -> EvalClassifier:
    if not net.heldout_accuracy >= min_accuracy:
        raise UserError(f"eval classifier {path}: held-out accuracy {net.heldout_accuracy:.3f} is below the minimum "
                        f"{min_accuracy:g} (eval.classifier.min_accuracy): it cannot judge samples; train it longer "
                        f"(eval.classifier.steps, now {int(steps)})")
    return net


def _load_cached(path: Path, data: ClassifierData, want: str, settings: dict[str, int]) -> EvalClassifier | None:
    """The cached classifier, or None when it was trained with other settings (then it is trained again)."""
    side = _sidecar(path)
    if not side.exists():
        raise UserError(f"eval classifier at {path} has no sidecar {side.name}; delete it to retrain")
    try:
        meta = json.loads(side.read_text())
        have = _data_desc(meta["image_shape"], meta["num_classes"], meta["n_train"], meta["fingerprint"])
        width, feature_dim, stored_acc = int(meta["width"]), int(meta["feature_dim"]), float(meta["heldout_accuracy"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"eval classifier sidecar {side} is unreadable ({exc!r}); delete both files to retrain") from exc
    if have != want:
        raise UserError(
            f"eval classifier at {path} was trained for {have} but data is {want}; "
            "delete it or choose another classifier path"
        )
    if meta.get("train") != settings:
        log.info("eval classifier at %s was trained with %s, the config says %s: training it again", path,
                 meta.get("train"), settings)
        return None
    net = EvalClassifier(int(data.image_shape[0]), data.num_classes, width=width, feature_dim=feature_dim)
    try:
        ms.load_checkpoint(str(path), net, strict_load=True, format="safetensors")
    except (ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"could not load eval classifier at {path} ({exc}); delete it to retrain") from exc
    net.set_train(False)
    net.heldout_accuracy = stored_acc
    log.info("loaded eval classifier %s (held-out accuracy %.4f)", path, net.heldout_accuracy)
    return net
