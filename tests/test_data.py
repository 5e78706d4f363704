"""distill.core.data: every format on tiny files written here, the split, resizing, batches and errors."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from distill.core.data import FASHION_NAMES, ImageData, iterate_batches, load_data
from distill.core.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
KEYS = {"name", "root", "image_size", "held_out_fraction", "split_seed", "max_train", "class_names", "channels",
        "stream"}


def cfg(name: str, root: Path | None = None, **overrides):
    base = dict(name=name, root=None if root is None else str(root), image_size=None,
                held_out_fraction=0.2, split_seed=0, max_train=None, class_names=None)
    return OmegaConf.create({**base, **overrides})


# ----------------------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = np.array(array.shape, ">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051), gz)
    write(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049), gz)


def mnist_like(n: int, seed: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = 0, 255, 51  # known pixels
    return images, (np.arange(n) % 10).astype(np.uint8)


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], axis=1)
    return records.tobytes()


def cifar_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 1, 0, 0], images[:, 2, 0, 0] = 255, 0, 51  # R, G, B of pixel (0, 0)
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_folder(root: Path, per_class: int = 3, mode: str = "L", size: int = 5) -> Path:
    for c, value in (("cat", 0), ("dog", 255)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = value if mode == "L" else (value, 0, 51)
            Image.new(mode, (size, size), color).save(root / c / f"{i}.png")
    return root


def as_rows(images: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in images}


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_scaling():
    data = load_data(cfg("digits"))
    assert isinstance(data, ImageData)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert data.class_names == tuple("0123456789")
    assert len(data.train_images) + len(data.test_images) == 1797
    assert len(data.test_images) == round(1797 * 0.2)
    for x, y in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.flags.c_contiguous
        assert x.min() == -1.0 and x.max() == 1.0
        assert set(np.unique(x)) <= {np.float32(k / 8 - 1) for k in range(17)}  # 0..16 -> k/8 - 1
        assert set(np.unique(y)) == set(range(10))


def test_digits_split_is_deterministic_and_a_partition():
    from sklearn.datasets import load_digits

    a, b = load_data(cfg("digits")), load_data(cfg("digits"))
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    # train + test is exactly the whole dataset, each image once (a partition, so disjoint)
    full = load_digits()
    whole = np.concatenate([a.train_images, a.test_images]).reshape(1797, 64)
    labels = np.concatenate([a.train_labels, a.test_labels])
    expected = np.concatenate([full.data / 8.0 - 1.0, full.target[:, None]], axis=1)
    got = np.concatenate([whole, labels[:, None]], axis=1)
    rows_got, counts_got = np.unique(got, axis=0, return_counts=True)
    rows_expected, counts_expected = np.unique(expected.astype(np.float32), axis=0, return_counts=True)
    np.testing.assert_array_equal(rows_got, rows_expected)
    np.testing.assert_array_equal(counts_got, counts_expected)
    other = load_data(cfg("digits", split_seed=1))
    assert not np.array_equal(other.test_images, a.test_images)


def test_digits_held_out_fraction_and_max_train():
    full = load_data(cfg("digits"))
    capped = load_data(cfg("digits", max_train=50))
    assert len(capped.train_images) == 50
    np.testing.assert_array_equal(capped.train_images, full.train_images[:50])
    np.testing.assert_array_equal(capped.test_images, full.test_images)
    assert len(load_data(cfg("digits", held_out_fraction=0.5)).test_images) == round(1797 * 0.5)


def test_digits_resize():
    data = load_data(cfg("digits", image_size=16, max_train=20))
    assert data.image_shape == (1, 16, 16) and data.test_images.shape[1:] == (1, 16, 16)
    assert data.train_images.dtype == np.float32
    assert data.train_images.min() >= -1.0 and data.train_images.max() <= 1.0
    small = load_data(cfg("digits", image_size=4, max_train=20))
    assert small.image_shape == (1, 4, 4)


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gz(tmp_path, gz):
    train_x, train_y = mnist_like(7, seed=0)
    test_x, test_y = mnist_like(3, seed=1)
    write_idx(tmp_path, "train", train_x, train_y, gz)
    write_idx(tmp_path, "t10k", test_x, test_y, gz)
    data = load_data(cfg("mnist", tmp_path))
    assert data.image_shape == (1, 6, 6) and data.class_names == tuple("0123456789")
    assert data.train_images.shape == (7, 1, 6, 6) and data.test_images.shape == (3, 1, 6, 6)
    # the official test files are the held-out split, in file order
    np.testing.assert_array_equal(data.test_labels, test_y.astype(np.int32))
    np.testing.assert_array_equal(data.test_images[:, 0], test_x / np.float32(127.5) - 1)
    # the train split is shuffled, but every (image, label) pair survives exactly
    label_of = {image.tobytes(): int(label) for image, label in zip(train_x, train_y)}
    restored = np.rint((data.train_images[:, 0] + 1) * 127.5).astype(np.uint8)
    assert [label_of[x.tobytes()] for x in restored] == data.train_labels.tolist()
    assert sorted(data.train_labels.tolist()) == sorted(train_y.tolist())
    assert data.train_images[0, 0, 0, 0] == -1.0 and data.train_images[0, 0, 0, 1] == 1.0
    assert data.train_images[0, 0, 0, 2] == np.float32(51 / 127.5 - 1)
    assert data.train_labels.dtype == np.int32


def test_fashion_mnist_names_and_split_without_test_files(tmp_path):
    train_x, train_y = mnist_like(10, seed=0)
    write_idx(tmp_path, "train", train_x, train_y, gz=True)
    data = load_data(cfg("fashion_mnist", tmp_path))
    assert data.class_names == FASHION_NAMES and data.num_classes == 10
    assert len(data.train_images) == 8 and len(data.test_images) == 2
    assert as_rows(data.train_images).isdisjoint(as_rows(data.test_images))
    again = load_data(cfg("fashion_mnist", tmp_path))
    np.testing.assert_array_equal(again.test_images, data.test_images)


def test_mnist_resize_and_class_names_override(tmp_path):
    write_idx(tmp_path, "train", *mnist_like(4, seed=0))
    names = [f"c{i}" for i in range(10)]
    data = load_data(cfg("mnist", tmp_path, image_size=12, class_names=names))
    assert data.image_shape == (1, 12, 12) and data.class_names == tuple(names)
    assert -1.0 <= data.train_images.min() and data.train_images.max() <= 1.0


def test_mnist_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"missing file .*train-images-idx3-ubyte \(expected MNIST IDX"):
        load_data(cfg("mnist", tmp_path))
    write_idx(tmp_path, "train", *mnist_like(4, seed=0))
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(mnist_like(2, 1)[0], 2051))
    with pytest.raises(UserError, match=r"missing file .*t10k-labels-idx1-ubyte"):
        load_data(cfg("mnist", tmp_path))


def test_mnist_bad_magic(tmp_path):
    images, labels = mnist_like(4, seed=0)
    write_idx(tmp_path, "train", images, labels)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, 1234))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte is not an IDX image file \(magic 1234, "
                                        r"expected 2051\)"):
        load_data(cfg("mnist", tmp_path))
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, 2051))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(images, 2051))
    with pytest.raises(UserError, match=r"not an IDX label file \(magic 2051, expected 2049\)"):
        load_data(cfg("mnist", tmp_path))


def test_mnist_truncated_file(tmp_path):
    images, labels = mnist_like(4, seed=0)
    write_idx(tmp_path, "train", images, labels)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, 2051)[:-5])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte has 155 bytes, expected 160"):
        load_data(cfg("mnist", tmp_path))


def test_mnist_count_mismatch(tmp_path):
    images, labels = mnist_like(4, seed=0)
    write_idx(tmp_path, "train", images, labels[:3], gz=True)
    with pytest.raises(UserError, match=r"has 4 images but .*train-labels-idx1-ubyte.gz has 3 labels"):
        load_data(cfg("mnist", tmp_path))


def test_mnist_empty_train_file(tmp_path):
    write_idx(tmp_path, "train", np.zeros((0, 6, 6), np.uint8), np.zeros(0, np.uint8))
    write_idx(tmp_path, "t10k", *mnist_like(2, seed=0))
    with pytest.raises(UserError, match=r"has no training images"):
        load_data(cfg("mnist", tmp_path))


def test_mnist_bad_gzip_and_bad_label(tmp_path):
    images, labels = mnist_like(4, seed=0)
    write_idx(tmp_path, "train", images, np.array([0, 1, 2, 12], np.uint8))
    with pytest.raises(UserError, match=r"has label 12 but only 10 class names"):
        load_data(cfg("mnist", tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"cannot read .*train-images-idx3-ubyte.gz"):
        load_data(cfg("mnist", tmp_path))


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_binary(tmp_path, subfolder):
    where = tmp_path / "cifar-10-batches-bin" if subfolder else tmp_path
    where.mkdir(exist_ok=True)
    train_x, train_y = cifar_like(5, seed=0)
    test_x, test_y = cifar_like(2, seed=1)
    (where / "data_batch_1.bin").write_bytes(cifar_bytes(train_x[:3], train_y[:3]))
    (where / "data_batch_3.bin").write_bytes(cifar_bytes(train_x[3:], train_y[3:]))
    (where / "test_batch.bin").write_bytes(cifar_bytes(test_x, test_y))
    data = load_data(cfg("cifar10", tmp_path))
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert len(data.train_images) == 5
    np.testing.assert_array_equal(data.test_labels, test_y.astype(np.int32))
    np.testing.assert_array_equal(data.test_images, test_x / np.float32(127.5) - 1)  # channel-major
    assert tuple(data.train_images[0, :, 0, 0]) == (1.0, -1.0, np.float32(51 / 127.5 - 1))
    assert sorted(data.train_labels.tolist()) == sorted(train_y.tolist())


def test_cifar10_meta_names_split_and_resize(tmp_path):
    images, labels = cifar_like(10, seed=0)
    (tmp_path / "data_batch_2.bin").write_bytes(cifar_bytes(images, labels))
    names = [f"thing{i}" for i in range(10)]
    (tmp_path / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    data = load_data(cfg("cifar10", tmp_path, image_size=8))
    assert data.class_names == tuple(names)
    assert data.image_shape == (3, 8, 8) and len(data.train_images) == 8 and len(data.test_images) == 2


def test_cifar10_bad_size(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(1000))
    with pytest.raises(UserError, match=r"data_batch_1.bin has 1000 bytes, not a multiple of 3073 "
                                        r"\(CIFAR-10 binary record size\)"):
        load_data(cfg("cifar10", tmp_path))


def test_cifar10_missing_batches(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(cifar_bytes(*cifar_like(2, seed=0)))
    with pytest.raises(UserError, match=r"missing file .*data_batch_1.bin \(expected CIFAR-10 binary batches"):
        load_data(cfg("cifar10", tmp_path))


# ----------------------------------------------------------------------------- image folder


def test_folder_grayscale(tmp_path):
    data = load_data(cfg("folder", write_folder(tmp_path, per_class=5)))
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.image_shape == (1, 5, 5)
    assert len(data.train_images) == 8 and len(data.test_images) == 2
    everything = np.concatenate([data.train_images, data.test_images])
    labels = np.concatenate([data.train_labels, data.test_labels])
    assert (everything[labels == 0] == -1.0).all() and (everything[labels == 1] == 1.0).all()
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5


def test_folder_rgb_when_any_image_has_color(tmp_path):
    write_folder(tmp_path)
    Image.new("RGB", (5, 5), (255, 0, 51)).save(tmp_path / "dog" / "color.png")
    data = load_data(cfg("folder", tmp_path))
    assert data.image_shape == (3, 5, 5)
    pixels = {tuple(x[:, 0, 0]) for x in np.concatenate([data.train_images, data.test_images])}
    assert (1.0, -1.0, np.float32(51 / 127.5 - 1)) in pixels and (-1.0, -1.0, -1.0) in pixels


def _write_16bit(root: Path, values_per_class: dict[str, list[int]], size: int = 4) -> None:
    for name, values in values_per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(values):
            Image.fromarray(np.full((size, size), v, np.uint16)).save(root / name / f"{i}.png")


def test_folder_of_16_bit_grayscale_is_scaled_by_its_range_and_stays_one_channel(tmp_path, caplog):
    """The issue's case: a folder of 16-bit grayscale PNGs became all-white 3-channel data."""
    _write_16bit(tmp_path, {"dark": [0, 1000, 4000], "mid": [20000, 32768, 40000], "bright": [60000, 65535, 65535]})
    caplog.set_level("INFO", logger="distill.core.data")
    data = load_data(cfg("folder", tmp_path, held_out_fraction=0.3))
    assert data.image_shape == (1, 4, 4)
    images = np.concatenate([data.train_images, data.test_images])
    pixels = sorted(float(x) for x in images[:, 0, 0, 0])
    expected = sorted(v / 32767.5 - 1 for v in [0, 1000, 4000, 20000, 32768, 40000, 60000, 65535, 65535])
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert "9 of 9 images" in caplog.text and "16 bits per channel" in caplog.text and "65535" in caplog.text


def test_folder_mixing_8_and_16_bit_images_scales_both_to_one_range(tmp_path):
    _write_16bit(tmp_path, {"a": [65535, 0]})
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "b" / "white8.png")
    Image.fromarray(np.full((4, 4), 0, np.uint8)).save(tmp_path / "b" / "black8.png")
    data = load_data(cfg("folder", tmp_path, held_out_fraction=0.25))
    images = np.concatenate([data.train_images, data.test_images])
    assert sorted(float(x) for x in images[:, 0, 0, 0]) == [-1.0, -1.0, 1.0, 1.0]


def test_channels_option_converts_and_logs(tmp_path, caplog):
    caplog.set_level("INFO", logger="distill.core.data")
    gray = load_data(cfg("folder", write_folder(tmp_path / "g"), channels=3))
    assert gray.image_shape[0] == 3 and "grayscale repeated to 3 channels" in caplog.text
    np.testing.assert_array_equal(gray.train_images[:, 0], gray.train_images[:, 2])
    digits3 = load_data(cfg("digits", channels=3))
    assert digits3.image_shape == (3, 8, 8) and "converted from 1 to 3 channel(s)" in caplog.text
    digits = load_data(cfg("digits"))
    np.testing.assert_array_equal(digits3.train_images[:, 1], digits.train_images[:, 0])
    with pytest.raises(UserError, match=r"data: channels 2 must be 1 \(grayscale\), 3 \(RGB\) or null"):
        load_data(cfg("digits", channels=2))


def test_floating_point_or_32_bit_images_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "a" / "x.tiff")
    with pytest.raises(UserError, match=r"x.tiff has F pixels \(floating point or 32-bit\)"):
        load_data(cfg("folder", tmp_path))
    (tmp_path / "a" / "x.tiff").unlink()
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "a" / "y.tif")
    with pytest.raises(UserError, match=r"y.tif has pixel values 70000..70000, outside the 16-bit range"):
        load_data(cfg("folder", tmp_path))


def test_folder_sizes_differ(tmp_path):
    write_folder(tmp_path)
    Image.new("L", (7, 9)).save(tmp_path / "cat" / "big.png")
    with pytest.raises(UserError, match=r"different sizes .*big.png is 7x9.*set data.image_size"):
        load_data(cfg("folder", tmp_path))
    data = load_data(cfg("folder", tmp_path, image_size=6))
    assert data.image_shape == (1, 6, 6)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"no class sub-folders in"):
        load_data(cfg("folder", tmp_path))
    write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"class folder .*empty has no images"):
        load_data(cfg("folder", tmp_path))
    (tmp_path / "empty" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"cannot read image .*broken.png"):
        load_data(cfg("folder", tmp_path))


# ----------------------------------------------------------------------------- config errors


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'foo' \(choose digits, mnist, fashion_mnist, "
                                        r"cifar10, folder\)"):
        load_data(cfg("foo"))
    with pytest.raises(UserError, match=r"image_size 3 is too small \(need >= 4\)"):
        load_data(cfg("digits", image_size=3))
    with pytest.raises(UserError, match=r"data.root is required for dataset 'mnist'"):
        load_data(cfg("mnist"))
    with pytest.raises(UserError, match=r"root .*nowhere is not a folder"):
        load_data(cfg("cifar10", tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"held_out_fraction 1.5"):
        load_data(cfg("digits", held_out_fraction=1.5))
    with pytest.raises(UserError, match=r"max_train 0"):
        load_data(cfg("digits", max_train=0))
    with pytest.raises(UserError, match=r"split_seed -1"):
        load_data(cfg("digits", split_seed=-1))
    with pytest.raises(UserError, match=r"image_size must be an integer"):
        load_data(cfg("digits", image_size="big"))


def test_conf_group_files_have_every_key():
    for name in ("digits", "mnist", "fashion_mnist", "cifar10", "folder"):
        conf = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
        assert set(conf.keys()) - {"defaults"} == KEYS and conf.name == name  # defaults: the schema
        assert conf.held_out_fraction == 0.2 and conf.split_seed == 0


def test_conf_group_composes_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        conf = compose(config_name=None, overrides=["+data=digits", "data.max_train=30"])
    data = load_data(conf.data)
    assert len(data.train_images) == 30 and data.image_shape == (1, 8, 8)


# ----------------------------------------------------------------------------- batches


def test_iterate_batches_epochs_are_seeded_permutations():
    images = np.arange(10, dtype=np.float32)[:, None, None, None]
    labels = np.arange(10, dtype=np.int32)
    stream = iterate_batches(images, labels, batch_size=3, seed=7)
    batches = list(itertools.islice(stream, 6))  # 3 full batches per epoch, the 10th item dropped
    assert all(x.shape == (3, 1, 1, 1) and y.shape == (3,) for x, y in batches)
    for x, y in batches:
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # pairs stay together
    for epoch in (0, 1):
        seen = np.concatenate([y for _, y in batches[3 * epoch:3 * epoch + 3]])
        np.testing.assert_array_equal(seen, np.random.default_rng((7, epoch)).permutation(10)[:9])
    again = list(itertools.islice(iterate_batches(images, labels, 3, seed=7), 6))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(itertools.islice(iterate_batches(images, labels, 3, seed=8), 6))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(batches, other))


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (3, 5)])
def test_iterate_batches_resume(n, batch_size):
    images = np.random.default_rng(0).normal(size=(n, 1, 2, 2)).astype(np.float32)
    labels = np.arange(n, dtype=np.int32)
    full = list(itertools.islice(iterate_batches(images, labels, batch_size, seed=3), 12))
    for k in (0, 1, 2, 3, 5, 7):
        resumed = list(itertools.islice(iterate_batches(images, labels, batch_size, seed=3, start_step=k), 12 - k))
        for (xa, ya), (xb, yb) in zip(full[k:], resumed):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)


def test_iterate_batches_small_dataset_samples_with_replacement():
    images = np.zeros((3, 1, 2, 2), np.float32)
    labels = np.arange(3, dtype=np.int32)
    batches = list(itertools.islice(iterate_batches(images, labels, 8, seed=0), 4))
    assert all(y.shape == (8,) and set(y.tolist()) <= {0, 1, 2} for _, y in batches)
    assert len({y.tobytes() for _, y in batches}) > 1  # different draws per step
    again = list(itertools.islice(iterate_batches(images, labels, 8, seed=0), 4))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))


def test_iterate_batches_errors_are_raised_eagerly():
    images, labels = np.zeros((4, 1, 2, 2), np.float32), np.zeros(4, np.int32)
    with pytest.raises(UserError, match=r"4 images but 3 labels"):
        iterate_batches(images, labels[:3], 2, seed=0)
    with pytest.raises(UserError, match=r"batch_size 0"):
        iterate_batches(images, labels, 0, seed=0)
    with pytest.raises(UserError, match=r"start_step -1"):
        iterate_batches(images, labels, 2, seed=0, start_step=-1)
