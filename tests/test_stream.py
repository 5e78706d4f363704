"""data.stream=true: the file-based data sets read their training images batch by batch through a
mindspore.dataset pipeline (MindSpore's MnistDataset / Cifar10Dataset / ImageFolderDataset where they read
the files as the project's reader does, else a GeneratorDataset over that reader) and give the same images,
bit for bit, the same batches and the same errors as the in-memory loader."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from distill.core.data import StreamedImages, iterate_batches, load_data
from distill.core.streaming import NativeSource, ReaderSource
from distill.core.errors import UserError
from test_data import cfg, cifar_bytes, cifar_like, mnist_like, write_idx, _write_16bit


def both(name: str, root: Path, **overrides):
    """(in memory, streamed) for the same data config."""
    return load_data(cfg(name, root, **overrides)), load_data(cfg(name, root, stream=True, **overrides))


def assert_same(memory, streamed, batch_size: int = 4) -> None:
    assert isinstance(streamed.train_images, StreamedImages) and isinstance(memory.train_images, np.ndarray)
    assert streamed.image_shape == memory.image_shape and streamed.class_names == memory.class_names
    assert len(streamed.train_images) == len(memory.train_images)
    np.testing.assert_array_equal(streamed.train_labels, memory.train_labels)
    assert streamed.test_images.tobytes() == memory.test_images.tobytes()
    np.testing.assert_array_equal(streamed.test_labels, memory.test_labels)
    assert streamed.train_images[np.arange(len(memory.train_images))].tobytes() == memory.train_images.tobytes()
    # the seeded batch stream over three epochs (and from a later start step): the same batches, bit for bit
    for start in (0, 5):
        ours = iterate_batches(streamed.train_images, streamed.train_labels, batch_size, 3, start)
        theirs = iterate_batches(memory.train_images, memory.train_labels, batch_size, 3, start)
        for (x, y), (mx, my) in itertools.islice(zip(ours, theirs), 3 * len(memory.train_images) // batch_size):
            assert x.dtype == np.float32 and x.tobytes() == mx.tobytes()
            np.testing.assert_array_equal(y, my)


def reader_of(data) -> type:
    return type(data.train_images.source)


def write_rgb_folder(root: Path, sizes=(9, 9), per_class: int = 5) -> Path:
    """Three class folders of ``per_class`` random RGB PNGs each, plus one grayscale image in the last."""
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cow"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*sizes, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, sizes, dtype=np.uint8)).save(root / "cow" / "gray.png")  # one grayscale
    return root


def test_an_image_folder_streams_the_same_images_and_batches(tmp_path: Path) -> None:
    root = write_rgb_folder(tmp_path)
    memory, streamed = both("folder", root, image_size=6, held_out_fraction=0.25)
    assert reader_of(streamed) is NativeSource  # ImageFolderDataset hands over the bytes, Pillow decodes
    assert_same(memory, streamed)
    assert_same(*both("folder", root, channels=1, max_train=7))


def test_a_folder_the_native_source_would_list_differently_streams_through_the_reader(tmp_path: Path, caplog) -> None:
    root = write_rgb_folder(tmp_path)
    # a file named only ".png": ImageFolderDataset lists it, the project's reader (no suffix) does not
    (root / "ant" / ".png").write_bytes((root / "ant" / "0.png").read_bytes())
    caplog.set_level("INFO", logger="distill.core.data")
    memory, streamed = both("folder", root, held_out_fraction=0.25)
    assert reader_of(streamed) is ReaderSource and "not mindspore.dataset.ImageFolderDataset" in caplog.text
    assert_same(memory, streamed)


def test_a_folder_of_16_and_8_bit_images_streams_with_one_scale(tmp_path: Path) -> None:
    _write_16bit(tmp_path, {"a": [65535, 0, 30000], "b": [1, 2, 40000]})
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "b" / "white8.png")
    assert_same(*both("folder", tmp_path, held_out_fraction=0.3), batch_size=2)


@pytest.mark.parametrize("with_test", [True, False])
def test_cifar10_batches_stream_the_same_images(tmp_path: Path, with_test: bool) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(cifar_bytes(*cifar_like(12, 0)))
    (tmp_path / "data_batch_2.bin").write_bytes(cifar_bytes(*cifar_like(9, 1)))
    if with_test:
        (tmp_path / "test_batch.bin").write_bytes(cifar_bytes(*cifar_like(6, 2)))
    assert_same(*both("cifar10", tmp_path, image_size=16, channels=1))
    memory, streamed = both("cifar10", tmp_path, max_train=10)
    assert reader_of(streamed) is ReaderSource  # Cifar10Dataset reads 10,000 records a batch file
    assert_same(memory, streamed)


def test_official_size_cifar10_batches_stream_through_cifar10dataset(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(cifar_bytes(*cifar_like(10000, 0)))
    (tmp_path / "test_batch.bin").write_bytes(cifar_bytes(*cifar_like(6, 2)))
    memory, streamed = both("cifar10", tmp_path, max_train=24, image_size=8, channels=1)
    assert reader_of(streamed) is NativeSource
    assert_same(memory, streamed)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_28x28_idx_files_stream_through_mnistdataset(tmp_path: Path, name: str) -> None:
    write_idx(tmp_path, "train", *mnist_like(30, 0, size=28))
    memory, streamed = both(name, tmp_path, image_size=6, held_out_fraction=0.2)
    assert reader_of(streamed) is NativeSource
    assert_same(memory, streamed)
    write_idx(tmp_path, "t10k", *mnist_like(5, 1, size=28))
    assert_same(*both(name, tmp_path))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_training_files_larger_than_the_limit_stream_through_the_memory_mapping_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, name: str) -> None:
    import distill.core.streaming as streaming

    if name == "mnist":
        write_idx(tmp_path, "train", *mnist_like(30, 0, size=28))
    else:
        (tmp_path / "data_batch_1.bin").write_bytes(cifar_bytes(*cifar_like(10000, 0)))
    size = sum(p.stat().st_size for p in tmp_path.iterdir() if "train" in p.name or "data_batch" in p.name)
    monkeypatch.setattr(streaming, "NATIVE_MAX_BYTES", size)  # at the limit: still MindSpore's source
    assert reader_of(load_data(cfg(name, tmp_path, stream=True, max_train=8))) is NativeSource
    monkeypatch.setattr(streaming, "NATIVE_MAX_BYTES", size - 1)
    caplog.set_level("INFO", logger="distill.core.data")
    memory, streamed = both(name, tmp_path, max_train=24, image_size=8)
    assert reader_of(streamed) is ReaderSource
    assert re.search(r"streams through the project's reader, not mindspore\.dataset\.(Mnist|Cifar10)Dataset: "
                     r"its training files hold \d+ MB and .* would read them whole into memory",
                     caplog.text), caplog.text
    assert_same(memory, streamed)


def test_a_native_source_that_orders_rows_otherwise_is_one_clear_error(tmp_path: Path) -> None:
    write_idx(tmp_path, "train", *mnist_like(12, 0, size=28))
    data = load_data(cfg("mnist", tmp_path, stream=True))
    source = data.train_images.source
    source.labels = np.roll(source.labels, 1)  # as if MnistDataset listed the rows in another order
    with pytest.raises(UserError, match=r"^data: mindspore.dataset.MnistDataset orders the files in .* differently "
                                        r"from the project's reader \(source row \d+ has label"):
        next(iterate_batches(data.train_images, data.train_labels, 4, 0))


def test_small_idx_images_stream_through_the_reader_and_gzip_ones_are_read_into_memory(tmp_path: Path, caplog) -> None:
    write_idx(tmp_path / "plain", "train", *mnist_like(20, 0))
    write_idx(tmp_path / "plain", "t10k", *mnist_like(5, 1))
    caplog.set_level("INFO", logger="distill.core.data")
    memory, streamed = both("mnist", tmp_path / "plain", image_size=4)
    assert reader_of(streamed) is ReaderSource and "MnistDataset reads 28x28 only" in caplog.text
    assert_same(memory, streamed)
    write_idx(tmp_path / "gz", "train", *mnist_like(20, 0), gz=True)
    caplog.set_level("INFO", logger="distill.core.data")
    data = load_data(cfg("fashion_mnist", tmp_path / "gz", stream=True))
    assert isinstance(data.train_images, np.ndarray) and "gzip-compressed: read into memory" in caplog.text


def test_the_embedded_digits_stay_in_memory() -> None:
    assert isinstance(load_data(cfg("digits", stream=True)).train_images, np.ndarray)


def test_an_image_that_fails_to_decode_mid_stream_is_one_clear_error(tmp_path: Path) -> None:
    root = write_rgb_folder(tmp_path)
    bad = root / "bee" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header reads, the pixels do not
    data = load_data(cfg("folder", root, stream=True, held_out_fraction=0.1))
    assert reader_of(data) is NativeSource  # the pipeline's error is given back as the reader's own line
    with pytest.raises(UserError, match=r"^data: cannot read image .*bee/3\.png \("):
        for _ in itertools.islice(iterate_batches(data.train_images, data.train_labels, 4, 0), 20):
            pass


def test_format_errors_are_today_s_before_any_reading(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(UserError, match=r"data_batch_1.bin has 1000 bytes, not a multiple of 3073"):
        load_data(cfg("cifar10", tmp_path, stream=True))
    write_idx(tmp_path / "m", "train", *mnist_like(4, 0))
    path = tmp_path / "m" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"has \d+ bytes, expected \d+ for dims \[4, 6, 6\]"):
        load_data(cfg("mnist", tmp_path / "m", stream=True))
    write_rgb_folder(tmp_path / "f", sizes=(9, 9))
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "f" / "ant" / "small.png")
    with pytest.raises(UserError, match=r"have different sizes .* is 9x7\); set data.image_size"):
        load_data(cfg("folder", tmp_path / "f", stream=True))


def test_the_classifier_trains_on_a_stream_as_on_the_array(tmp_path: Path) -> None:
    from distill.core.classifier import train_classifier
    from distill.core.weights import net_state

    memory, streamed = both("folder", write_rgb_folder(tmp_path), image_size=8)
    nets = [train_classifier(d.train_images, d.train_labels, d.num_classes, steps=3, batch_size=4, seed=1)
            for d in (memory, streamed)]
    for (key, a), b in zip(net_state(nets[0]).items(), net_state(nets[1]).values()):
        np.testing.assert_array_equal(a, b, err_msg=key)


def test_data_stream_is_a_config_key(tmp_path: Path) -> None:
    from conftest import compose_cfg

    conf = compose_cfg(tmp_path, "data=cifar10", "data.stream=true", "data.root=/x", tiny=False)
    assert conf.data.stream is True and OmegaConf.is_config(conf.data)


def test_under_data_parallelism_each_rank_reads_only_its_rows_of_each_step(tmp_path: Path) -> None:
    memory, streamed = both("folder", write_rgb_folder(tmp_path), held_out_fraction=0.25)
    source, read = streamed.train_images.source, {}
    for rank in (0, 1):
        asked = read[rank] = []
        source.dataset = (lambda ids, workers, _asked=asked, _native=type(source).dataset:
                          _asked.append(ids) or _native(source, ids, workers))
        ours = iterate_batches(streamed.train_images, streamed.train_labels, 4, 3, 2, share=(rank, 2))
        theirs = iterate_batches(memory.train_images, memory.train_labels, 4, 3, 2)
        for (x, y), (mx, my) in itertools.islice(zip(ours, theirs), 7):  # epochs of 3 steps, from step 2 to the end of epoch 2
            mine = slice(2 * rank, 2 * rank + 2)
            assert x[mine].tobytes() == mx[mine].tobytes() and not np.delete(x, mine, axis=0).any()
            np.testing.assert_array_equal(y, my)  # every rank has the whole batch's labels
    # the two ranks' reads together are the epochs' rows, each once
    both_ranks = np.sort(np.concatenate([np.concatenate(read[0]), np.concatenate(read[1])]))
    expected = np.concatenate([streamed.train_images.ids[np.random.default_rng((3, e)).permutation(12)[k:]]
                               for e, k in ((0, 8), (1, 0), (2, 0))])  # step 2 is epoch 0's last
    np.testing.assert_array_equal(both_ranks, np.sort(expected))


@pytest.mark.parametrize("ws_per_input", [1, 2])
def test_a_rank_s_slice_of_the_training_inputs_is_the_one_process_slice(tmp_path: Path, ws_per_input: int) -> None:
    from student.distill import distill_inputs
    from teacher.objective import teacher_batch_maker

    streamed = load_data(cfg("folder", write_rgb_folder(tmp_path), stream=True, image_size=4))
    for rank in (0, 1):
        rows = slice(4 * rank, 4 * rank + 4)  # what runtime.shard keeps of a global batch of 8 on 2 ranks
        for make in (lambda share: teacher_batch_maker(streamed, 8, 1, 0, "cosine", "eps", 0.1, share),
                     lambda share: distill_inputs(streamed, 8, 1, 0, "cosine", 1.0, 3.0, ws_per_input=ws_per_input,
                                                  share=share)):
            alone, shared = make(None), make((rank, 2))
            for step in range(3):
                for a, b in zip(alone(step), shared(step)):
                    assert a[rows].tobytes() == b[rows].tobytes()
