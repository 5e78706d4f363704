"""uint8 conversion, grids, PNG files and the samples .npz format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.core.images import (
    load_samples_npz,
    make_grid,
    save_grid_png,
    save_samples_npz,
    save_side_by_side_png,
    to_uint8,
)


def test_to_uint8_exact_values_and_layout() -> None:
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 1 / 127.5 - 1.0], np.float32).reshape(1, 1, 2, 4)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 4, 1)
    # round((x + 1) * 127.5): 63.75 -> 64, 127.5 -> 128 (round half to even), 191.25 -> 191
    np.testing.assert_array_equal(u.reshape(-1), [0, 0, 64, 128, 191, 255, 255, 1])
    rgb = np.stack([np.full((2, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])[None]
    u = to_uint8(rgb)
    assert u.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(u[0, 0, 0], [0, 128, 255])


def test_make_grid_shape_and_placement() -> None:
    imgs = np.full((5, 1, 8, 8), 1.0, np.float32)
    g = make_grid(imgs, nrow=3)  # 3 per row -> 2 rows, 1-pixel padding
    assert g.shape == (2 * 9 + 1, 3 * 9 + 1, 1) and g.dtype == np.uint8
    assert g[1:9, 1:9].min() == 255 and g[0].max() == 0
    assert g[10:18, 19:27].max() == 0  # the empty sixth cell
    assert make_grid(np.zeros((9, 3, 4, 4), np.float32)).shape == (3 * 5 + 1, 3 * 5 + 1, 3)


@pytest.mark.parametrize("c", [1, 3])
def test_grid_png_opens_with_expected_size(tmp_path: Path, c: int) -> None:
    imgs = np.random.default_rng(0).uniform(-1, 1, size=(10, c, 8, 8)).astype(np.float32)
    path = save_grid_png(imgs, tmp_path / "sub" / "grid.png", nrow=5, scale=4)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == ((5 * 9 + 1) * 4, (2 * 9 + 1) * 4)
        # nearest upscaling: every 4x4 block is constant and equals the grid pixel
        arr = np.asarray(im)
    grid = make_grid(imgs, nrow=5)
    np.testing.assert_array_equal(arr[::4, ::4, 0], grid[..., 0])
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp files left


def test_side_by_side_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(f"{m} w={w}", rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)) for w in (1, 3) for m in ("teacher", "student")]
    path = save_side_by_side_png(rows, tmp_path / "side.png", scale=3)
    with Image.open(path) as im:
        w, h = im.size
    strip_w, strip_h = (6 * 9 + 1) * 3, (9 + 1) * 3
    assert h == 4 * strip_h + 3 * 4 and w > strip_w  # label column on the left


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (7, 3, 8, 8)).astype(np.float32)
    labels = np.arange(7, dtype=np.int32) % 3
    path = save_samples_npz(tmp_path / "s.npz", imgs, labels, w=2.5, model="student", noise_seed=np.arange(7))
    out = load_samples_npz(path)
    assert set(out) == {"images", "labels", "w", "model", "noise_seed"}
    assert out["images"].dtype == np.uint8 and out["images"].shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(out["images"], to_uint8(imgs))
    assert np.issubdtype(out["labels"].dtype, np.integer)
    np.testing.assert_array_equal(out["labels"], labels)
    assert out["w"] == 2.5 and out["model"] == "student"
    np.testing.assert_array_equal(out["noise_seed"], np.arange(7))
    # plain np.load works too (outside tools), and already-uint8 NHWC input is stored as is
    with np.load(path) as z:
        assert z["images"].shape == (7, 8, 8, 3)
    path2 = save_samples_npz(tmp_path / "u.npz", out["images"], labels)
    np.testing.assert_array_equal(load_samples_npz(path2)["images"], out["images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "u.npz"]


def test_npz_rejects_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_samples_npz(tmp_path / "bad.npz", np.zeros((3, 1, 8, 8), np.float32), np.zeros(2, int))
    with pytest.raises(ValueError):
        save_samples_npz(tmp_path / "bad.npz", np.zeros((2, 8, 8), np.float32), np.zeros(2, int))
    assert not list(tmp_path.iterdir())
