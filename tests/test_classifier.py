"""Evaluation classifier: accuracy on digits, the on-disk cache, config checks, other image shapes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from sklearn.datasets import load_digits

import distill.core.classifier as C
from distill.core.errors import UserError

ms.set_device("CPU")


def _digits(n_train: int = 700, n_test: int = 300, offset: int = 0) -> SimpleNamespace:
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    y = d.target.astype(np.int32)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[offset : offset + n_train], idx[-n_test:]
    return SimpleNamespace(
        train_images=x[tr], train_labels=y[tr], test_images=x[te], test_labels=y[te],
        num_classes=10, image_shape=(1, 8, 8),
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimpleNamespace, C.EvalClassifier, float]:
    path = tmp_path_factory.mktemp("clf") / "eval_classifier.safetensors"
    data = _digits()
    t0 = time.perf_counter()
    clf = C.load_or_train_classifier(path, data, steps=200, batch_size=64, seed=0)
    return path, data, clf, time.perf_counter() - t0


def test_trains_to_high_heldout_accuracy(cached) -> None:
    path, data, clf, _ = cached
    acc = C.classifier_accuracy(clf, data.test_images, data.test_labels)
    assert acc >= 0.9
    assert C.classifier_accuracy(clf) == pytest.approx(acc)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["heldout_accuracy"] == pytest.approx(acc)
    assert meta["image_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_second_call_loads_and_predicts_identically(cached, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data, clf, _ = cached
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained instead of loading"))
    again = C.load_or_train_classifier(path, data, steps=200, batch_size=64, seed=0)
    f1, p1 = C.features_and_predictions(clf, data.test_images)
    f2, p2 = C.features_and_predictions(again, data.test_images, batch_size=37)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    assert C.classifier_accuracy(again) == C.classifier_accuracy(clf)
    assert f1.shape == (len(data.test_images), clf.config["feature_dim"]) and f1.dtype == np.float32


def test_cache_for_other_data_raises(cached) -> None:
    path, data, _, _ = cached
    other_classes = SimpleNamespace(**{**vars(data), "num_classes": 5})
    with pytest.raises(UserError, match="was trained for .* but data is"):
        C.load_or_train_classifier(path, other_classes, steps=200, batch_size=64)
    other_shape = SimpleNamespace(**{**vars(data), "image_shape": (3, 8, 8)})
    with pytest.raises(UserError, match="1x8x8 images.*but data is 3x8x8"):
        C.load_or_train_classifier(path, other_shape, steps=200, batch_size=64)
    other_images = _digits(offset=100)
    with pytest.raises(UserError, match="fingerprint"):
        C.load_or_train_classifier(path, other_images, steps=200, batch_size=64)


def test_missing_sidecar_raises(tmp_path: Path) -> None:
    path = tmp_path / "clf.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="sidecar"):
        C.load_or_train_classifier(path, _digits(), steps=1)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8)])
def test_other_image_shapes(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(20, *shape)).astype(np.float32)
    y = rng.integers(0, 4, size=20).astype(np.int32)
    clf = C.train_classifier(x, y, num_classes=4, steps=2, batch_size=8, width=8)
    logits, feats = clf(ms.Tensor(x[:5]))
    assert logits.shape == (5, 4) and feats.shape == (5, 128)
    f, p = C.features_and_predictions(clf, x, batch_size=7)
    assert f.shape == (20, 128) and p.shape == (20,) and p.max() < 4


def test_training_is_seeded() -> None:
    data = _digits(n_train=200, n_test=50)
    a = C.train_classifier(data.train_images, data.train_labels, 10, steps=5, batch_size=32, seed=3)
    b = C.train_classifier(data.train_images, data.train_labels, 10, steps=5, batch_size=32, seed=3)
    fa, _ = C.features_and_predictions(a, data.test_images)
    fb, _ = C.features_and_predictions(b, data.test_images)
    np.testing.assert_array_equal(fa, fb)


def test_an_untrained_classifier_is_refused_as_a_judge_and_not_cached(tmp_path: Path) -> None:
    """The issue's case: ``eval.classifier.steps=0`` once, and every later evaluation was judged by a
    classifier with held-out accuracy 0.05."""
    path = tmp_path / "clf.safetensors"
    data = _digits(n_train=200, n_test=100)
    with pytest.raises(UserError, match=r"held-out accuracy 0\.\d+ is below the minimum 0\.3 .*steps, now 0\)"):
        C.load_or_train_classifier(path, data, steps=0, batch_size=32, min_accuracy=0.3)
    assert list(tmp_path.iterdir()) == []
    clf = C.load_or_train_classifier(path, data, steps=60, batch_size=32, min_accuracy=0.3)
    assert clf.heldout_accuracy >= 0.3 and path.is_file()
    with pytest.raises(UserError, match="below the minimum 0.99"):  # a stricter judge refuses the cached one too
        C.load_or_train_classifier(path, data, steps=60, batch_size=32, min_accuracy=0.99)


def test_a_cache_trained_with_other_settings_is_trained_again(tmp_path: Path) -> None:
    path = tmp_path / "clf.safetensors"
    data = _digits(n_train=200, n_test=100)
    first = C.load_or_train_classifier(path, data, steps=5, batch_size=32)
    feats_first, _ = C.features_and_predictions(first, data.test_images)
    again = C.load_or_train_classifier(path, data, steps=40, batch_size=32)
    assert json.loads(path.with_name(path.name + ".json").read_text())["train"] == {
        "steps": 40, "batch_size": 32, "seed": 0}
    loaded = C.load_or_train_classifier(path, data, steps=40, batch_size=32)  # the same settings: the cache
    feats_again, _ = C.features_and_predictions(again, data.test_images)
    feats_loaded, _ = C.features_and_predictions(loaded, data.test_images)
    assert not np.allclose(feats_first, feats_again)
    np.testing.assert_allclose(feats_loaded, feats_again, rtol=1e-5, atol=1e-6)


def test_min_accuracy_must_be_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"min_accuracy 1\.5 must be a number in \[0, 1\]"):
        C.load_or_train_classifier(tmp_path / "c.safetensors", _digits(), steps=1, min_accuracy=1.5)
