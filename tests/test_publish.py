"""Publishing: a self-contained, verified bundle that loads in one call and samples like the in-memory student."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn

from conftest import TINY_RUN, compose_cfg
from distill.app import resolve_task
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.images import load_samples_npz
from distill.core.sampling import jit_predictor, sample_in_batches
from student import from_pretrained
from distill.jobs import publish, sample as sample_job
from student.bundle import verify_manifest
from student.card import evaluation_section, per_w_rows
from student.loading import load_student
from teacher.guidance import ConditionalPrediction
from distill.jobs.common import guided_samples

FILES = {"config.json", "model.safetensors", "model_4step.safetensors", "model.mindir", "sampler.mindir",
         "README.md", "samples.png", "negative_classes.png", "manifest.json"}


@pytest.fixture(scope="module")
def bundle(published_run: Path) -> Path:
    """Published from a private copy of the run's checkpoints (other tests add an evaluation to tiny_run); the
    tests here only read it or work on copies of it."""
    return published_run / "bundle"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_bundle_is_complete_and_self_describing(bundle: Path) -> None:
    assert {p.name for p in bundle.iterdir()} == FILES
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle", "progressive", "student", "teacher"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    config = json.loads((bundle / "config.json").read_text())
    assert config["guidance"] == {"w_min": 0.0, "w_max": 5.0, "convention": "uncond + w * (cond - uncond)",
                                  "w_schedules": ["constant", "linear", "cosine"], "negative_classes": True}
    assert config["model"]["guidance_embed_dim"] > 0 and config["classes"]["null_class"] == 10
    assert config["mindir"]["batch_size"] == 16 and config["mindir"]["inputs"][0]["shape"] == [16, 1, 8, 8]
    assert config["training"]["teacher_steps"] == 4 and config["training"]["student_steps"] == 4
    card = (bundle / "README.md").read_text()
    assert "Not evaluated yet" in card and "samples.png" in card and "fixed batch of 16" in card
    assert resolve_task("publish") is publish.run_publish and resolve_task("sample") is sample_job.run_sample


def test_import_student_is_cheap() -> None:
    code = "import sys, student; assert 'mindspore' not in sys.modules; assert callable(student.from_pretrained)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_default_variant_is_the_last_progressive_round(bundle: Path, tiny_run: Path) -> None:
    """The bundle samples with the few-step round by default, at its steps; the stage-one student is one argument away."""
    cfg = compose_cfg(tiny_run)
    data = load_data(cfg.data)
    config = json.loads((bundle / "config.json").read_text())
    assert config["default_variant"] == "2step" and config["sampler"]["num_steps"] == 2
    assert config["variants"]["4step"] == {"weights": "model_4step.safetensors", "num_steps": 4, "stage": "distill"}
    model = from_pretrained(bundle)
    assert model.settings().num_steps == 2
    round_net, _ = load_student(cfg, data, tiny_run / "progressive" / "steps_2" / "checkpoint.safetensors")
    loaded = dict(model.net.parameters_and_names())
    for name, p in round_net.parameters_and_names():
        np.testing.assert_array_equal(loaded[name].asnumpy(), p.asnumpy(), err_msg=name)
    predict = jit_predictor(ConditionalPrediction(round_net))
    expected, labels = guided_samples(predict, data, cfg, 2.0, 6, 1, model.settings())
    np.testing.assert_array_equal(model.sample(labels, 2.0, seed=1, batch_size=int(cfg.sampler.batch_size)), expected)
    with pytest.raises(UserError, match="no variant '8step' .*it has: 4step, 2step"):
        from_pretrained(bundle, variant="8step")


def test_from_pretrained_samples_bit_identical_to_in_memory_student(bundle: Path, tiny_run: Path) -> None:
    cfg = compose_cfg(tiny_run)
    data = load_data(cfg.data)
    net, _ = load_student(cfg, data)
    model = from_pretrained(bundle, variant="4step")
    assert model.settings().num_steps == 4
    loaded = dict(model.net.parameters_and_names())
    for name, p in net.parameters_and_names():
        np.testing.assert_array_equal(loaded[name].asnumpy(), p.asnumpy(), err_msg=name)

    predict = jit_predictor(ConditionalPrediction(net))
    n, w, seed = 12, 2.0, 5
    expected, labels = guided_samples(predict, data, cfg, w, n, seed)
    got = model.sample(labels, w, seed=seed, batch_size=int(cfg.sampler.batch_size))
    np.testing.assert_array_equal(got, expected)
    # explicit noise and a w schedule, through the sampler directly
    noise = np.random.default_rng(9).standard_normal((n, 1, 8, 8)).astype(np.float32)
    settings = model.settings(w_schedule="linear")
    expected = sample_in_batches(predict, noise, labels, 1.5, settings, np.full(n, 10, np.int32), 8, seed=3)
    got = model.sample(labels, 1.5, seed=3, w_schedule="linear", batch_size=8, noise=noise)
    np.testing.assert_array_equal(got, expected)


def test_w_outside_the_distilled_range_is_refused(bundle: Path) -> None:
    model = from_pretrained(bundle)
    with pytest.raises(UserError, match=r"outside the distilled range \[0, 5\]"):
        model.sample([0], 6.0)
    with pytest.raises(UserError, match="linear schedule spans"):
        model.sample([0], 4.0, w_schedule="linear")  # mean 4, but the last of 3 steps has w = 6.7
    # allowed, w = 6 is really used (not clamped to the range's end): the sampler's own output at w = 6.
    # The tiny student barely depends on w yet: give its guidance layers weights that matter.
    rng = np.random.default_rng(0)
    for name, param in model.net.parameters_and_names():
        if "guidance_" in name:
            param.set_data(ms.Tensor(0.3 * rng.standard_normal(param.shape).astype(np.float32)))
    labels = np.array([0, 1], np.int32)
    got = model.sample(labels, 6.0, seed=2, allow_extrapolation=True)
    predict = jit_predictor(ConditionalPrediction(model.net))
    expected = sample_in_batches(predict, model.noise(2, 2), labels, 6.0, model.settings(),
                                 np.full(2, 10, np.int32), 2, seed=2)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, model.sample(labels, 5.0, seed=2))


def test_tampered_weights_fail_the_checksum(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch for model.safetensors"):
        from_pretrained(copy)


def test_truncated_or_missing_files_fail(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    raw = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="checksum mismatch for model.safetensors.*truncated"):
        from_pretrained(copy)
    (copy / "model.safetensors").write_bytes(raw)
    (copy / "samples.png").unlink()
    with pytest.raises(UserError, match="missing file samples.png"):
        from_pretrained(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json is missing"):
        from_pretrained(copy)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_overwrite_is_refused_then_replaces_atomically(bundle: Path, tiny_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dest = _copy(bundle, tmp_path)
    before = _snapshot(dest)
    with pytest.raises(UserError, match="already exists.*publish.overwrite=true"):
        publish.run_publish(compose_cfg(tiny_run, *TINY_RUN, f"publish.dir={dest}"))
    assert _snapshot(dest) == before

    def broken_export(*args, **kwargs):
        raise UserError("MINDIR export failed (simulated)")

    with monkeypatch.context() as m:  # a failure half-way through leaves the old bundle untouched
        m.setattr(publish, "export_mindir", broken_export)
        with pytest.raises(UserError, match="simulated"):
            publish.run_publish(compose_cfg(tiny_run, *TINY_RUN, f"publish.dir={dest}", "publish.overwrite=true"))
    assert _snapshot(dest) == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no partial or old folders left

    report = {"per_w": [{"w": 1.0, "student": {"fd": 1.5}}, {"w": 3.0, "student": {"fd": 2.25}}]}
    monkeypatch.setattr(publish, "read_report", lambda cfg: report)  # as if task=evaluate had run
    publish.run_publish(compose_cfg(tiny_run, *TINY_RUN, f"publish.dir={dest}", "publish.overwrite=true",
                                    "publish.card_ws=[0,3]"))
    after = _snapshot(dest)
    assert set(after) == FILES and b"0, 3" in after["README.md"]
    assert b"| w | student.fd |" in after["README.md"] and b"| 3 | 2.25 |" in after["README.md"]
    assert after["model.safetensors"] == before["model.safetensors"]
    verify_manifest(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


def test_model_card_evaluation_table_layouts() -> None:
    rows = [{"w": 1.0, "student": {"fd": 1.23456, "accuracy": 0.9}, "teacher": {"fd": 1.0}},
            {"w": 2.0, "student": {"fd": 0.5, "accuracy": 0.95}, "teacher": {"fd": 0.75}}]
    text = evaluation_section({"per_w": rows, "speedup": 1.9})
    assert "| w | student.fd | student.accuracy | teacher.fd |" in text
    assert "| 1 | 1.235 | 0.9 | 1 |" in text and "- speedup: 1.9" in text
    assert per_w_rows({"grid": {"0.0": {"fd": 3.0}, "2.0": {"fd": 1.0}}}) == [{"w": 0.0, "fd": 3.0},
                                                                             {"w": 2.0, "fd": 1.0}]
    assert "no per-w table" in evaluation_section({"note": "x"})
    # the layout task=evaluate writes: rendered with distill.report's own tables
    model = {"per_w": {"0.0": {"fd": 2.0, "accuracy": 0.5}, "2.0": {"fd": 1.0, "accuracy": 0.8}},
             "speed": {"seconds_per_image": 0.01, "images_per_s": 100.0, "network_evals_per_image": 6}}
    report = {"num_samples": 20, "ws": [0.0, 2.0], "real_vs_real_fd": 0.5, "speedup": 1.9,
              "models": {"teacher": dict(model, passes=2), "student": dict(model, passes=1)},
              "agreement": {"0.0": {"psnr": 30.0, "mse": 1e-3}, "2.0": {"psnr": 28.0, "mse": 2e-3}}}
    text = evaluation_section(report)
    assert "| w | teacher FD | student FD |" in text and "| 2 | 1.000 | 1.000 |" in text and "1.90x" in text
    assert "Not evaluated yet" in evaluation_section(None)


def test_mindir_runs_like_the_network(bundle: Path) -> None:
    model = from_pretrained(bundle)
    b = model.config["mindir"]["batch_size"]
    rng = np.random.default_rng(0)
    inputs = (ms.Tensor(rng.standard_normal((b, 1, 8, 8)).astype(np.float32)),
              ms.Tensor(rng.uniform(0.05, 0.95, b).astype(np.float32)),
              ms.Tensor(rng.integers(0, 10, b).astype(np.int32)),
              ms.Tensor(rng.uniform(0, 5, b).astype(np.float32)))
    graph = nn.GraphCell(ms.load(str(bundle / "model.mindir")))
    np.testing.assert_allclose(graph(*inputs).asnumpy(), model.net(*inputs).asnumpy(), atol=1e-5, rtol=1e-5)


def test_sampler_mindir_gives_the_python_samplers_images(bundle: Path) -> None:
    model = from_pretrained(bundle)
    spec = model.config["mindir_sampler"]
    b = spec["batch_size"]
    assert spec["num_steps"] == model.config["sampler"]["num_steps"] == 2 and spec["file"] == "sampler.mindir"  # the 2-step round
    labels = np.arange(b) % 10
    for w, seed in ((0.0, 1), (2.5, 2)):
        expected = model.sample(labels, w, seed=seed, batch_size=b)
        got = model.sample_mindir(labels, w, seed=seed)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the noise reaches the graph (labels and w barely move the tiny, hardly trained student)
    assert np.abs(model.sample_mindir(labels, 2.5, seed=3) - got).max() > 1e-3
    with pytest.raises(UserError, match="built for 2 steps, not 4"):
        model.sample_mindir(labels, 2.0, num_steps=4)
    with pytest.raises(UserError, match=f"built for batch {b}, got 2"):
        model.sample_mindir(labels[:2], 2.0)
    with pytest.raises(UserError, match="outside the distilled range"):
        model.sample_mindir(labels, 6.0)


def test_sample_task_writes_files_and_is_reproducible(bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [f"sample.bundle={bundle}", f"sample.out={out}", "sample.classes=[1,3]", "sample.per_class=2",
            "sample.w=1.5", "sample.steps=2", "sample.seed=4"]
    first = sample_job.run_sample(compose_cfg(tiny_run, *args))
    assert first.name == "student_w1.5_seed4_steps2.npz" and first.with_suffix(".png").is_file()
    a = load_samples_npz(first)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (4, 8, 8, 1)
    assert a["labels"].tolist() == [1, 1, 3, 3] and a["w"] == 1.5 and a["steps"] == 2 and a["seed"] == 4

    second = sample_job.run_sample(compose_cfg(tiny_run, *args))  # never overwrites: a new name, the same images
    assert second.name == "student_w1.5_seed4_steps2-2.npz" and first.is_file()
    np.testing.assert_array_equal(load_samples_npz(second)["images"], a["images"])

    other = sample_job.run_sample(compose_cfg(tiny_run, *args[:-1], "sample.seed=5"))
    assert not np.array_equal(load_samples_npz(other)["images"], a["images"])
    with pytest.raises(UserError, match="outside the distilled range"):
        sample_job.run_sample(compose_cfg(tiny_run, *args[:4], "sample.w=9"))
    with pytest.raises(UserError, match="sample.classes"):
        sample_job.run_sample(compose_cfg(tiny_run, *args[:2], "sample.classes=[12]"))


def test_a_bundle_with_non_finite_weights_is_refused_even_with_a_matching_manifest(bundle: Path,
                                                                                   tmp_path: Path) -> None:
    """The checksum only proves the file is the one published; the weights must also be numbers."""
    from student.bundle import write_manifest

    copy = _copy(bundle, tmp_path)
    params = ms.load_checkpoint(str(copy / "model.safetensors"), format="safetensors")
    name = sorted(params)[0]
    params[name] = ms.Parameter(ms.Tensor(np.full(params[name].shape, np.nan, np.float32)), name=name)
    (copy / "model.safetensors").unlink()
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(copy / "model.safetensors"),
                       format="safetensors")
    (copy / "manifest.json").unlink()
    write_manifest(copy)
    with pytest.raises(UserError, match=rf"weights .*model.safetensors holds non-finite weights \(NaN or inf in '{name}'"):
        from_pretrained(copy)
    assert from_pretrained(copy, variant="4step").config["variant"] == "4step"  # the untouched variant loads
