"""Shared test set-up: Hydra compose with tiny models, and one tiny trained teacher + student."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

os.environ.setdefault("GLOG_v", "3")

import mindspore  # noqa: E402,F401  (imported after GLOG_v is set, so its C++ logging is quiet)
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distill.core.config import register  # noqa: E402

if TYPE_CHECKING:
    from teacher.unet import UNet

register()  # the schemas the YAML files name (also stored when Hydra imports distill.conf)

CONF = "distill.conf"  # the installed package data, as the entry point finds it

# A model and budget small enough that a whole job takes seconds on 2 CPU cores.
TINY = [
    "model.channels=8", "model.channel_mult=[1,2]", "model.groups=4", "model.attention=false",
    "data.max_train=64", "teacher.train.steps=4", "teacher.train.batch_size=16",
    "teacher.train.checkpoint_every=2", "teacher.train.log_every=2", "teacher.train.warmup_steps=0",
    "teacher.check.num_samples=20", "student.train.steps=4", "student.train.batch_size=16",
    "student.train.checkpoint_every=2", "student.train.log_every=2", "student.targets_per_shard=3",
    "student.embed_dim=8", "eval.classifier.steps=20", "eval.negative_samples=5", "sampler.num_steps=4",
    "sampler.batch_size=20",
    "progressive.min_steps=2", "progressive.train.steps=2", "progressive.train.batch_size=16",
    "progressive.train.checkpoint_every=2", "progressive.train.log_every=2",
    "negative_phase.train.steps=2", "negative_phase.train.batch_size=16", "negative_phase.train.checkpoint_every=2",
    "negative_phase.train.log_every=2",
]


# What the shared tiny run (the ``tiny_run`` fixture) sets beyond TINY: its students are trained jointly with a
# negative class (opt-in), so the tests that read it cover that path, and so it has no negative phase (the default
# path: stage one, then the phase; test_pipeline, test_negative's phase_run). Tests that evaluate, publish or train
# its students further compose with these too.
TINY_RUN = ("student.negative=true", "negative_phase.enabled=false")


def copy_run(src: Path, dest: Path, stages: tuple[str, ...] = ("teacher", "student", "progressive")) -> Path:
    """A private copy of a run's stage folders (other tests write into the shared run itself); returns ``dest``."""
    for stage in stages:
        shutil.copytree(src / stage, dest / stage)
    return dest


def compose_cfg(run_dir: Path, *overrides: str, tiny: bool = True) -> DictConfig:
    """The app's config as `distill` would see it, writing into ``run_dir``."""
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose("config", overrides=[*(TINY if tiny else []), f"run_dir={run_dir}", *overrides])


@pytest.fixture(autouse=True, scope="session")
def _cpu() -> None:
    from distill.core.runtime import setup_runtime

    setup_runtime("CPU", 0)


@pytest.fixture(autouse=True)
def _chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed graph compile writes rank_0/ into the working directory: keep it out of the repo.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a tiny trained teacher, student and progressive round (shared by the tests that
    only read it)."""
    from distill.jobs.distill import run_distill
    from distill.jobs.progressive import run_progressive
    from distill.jobs.teacher import run_teacher

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_cfg(run_dir, *TINY_RUN)
    run_teacher(cfg)
    run_distill(cfg)
    run_progressive(cfg)
    return run_dir


@pytest.fixture(scope="session")
def published_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of ``tiny_run``'s checkpoints with the bundle ``task=publish`` makes of them in ``bundle/``
    (publishing exports two MINDIR graphs: done once for every test that only reads the bundle or copies it)."""
    from distill.jobs.publish import run_publish

    run = copy_run(tiny_run, tmp_path_factory.mktemp("published"))
    dest = run / "bundle"
    assert run_publish(compose_cfg(run, *TINY_RUN, f"publish.dir={dest}")) == dest
    return run


def random_teacher(seed: int = 0, attention: bool = False) -> UNet:
    """A tiny CFG teacher with random weights throughout: a new UNet's output layer starts at zero, which
    would make its conditional and unconditional outputs agree and guidance meaningless. MindSpore's
    global seed is set first, so the weights do not depend on the tests run before."""
    import mindspore as ms
    import numpy as np
    from teacher.unet import UNet, UNetConfig

    ms.set_seed(seed)
    teacher = UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=attention, image_size=8,
                              num_classes=10))
    rng = np.random.default_rng(seed)
    for p in teacher.trainable_params():
        p.set_data(ms.Tensor((p.asnumpy() + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    return teacher


def w_sensitive_student(seed: int = 0) -> UNet:
    """A tiny student of :func:`random_teacher` whose output depends on its w input: the guidance layers, which
    start at zero, perturbed."""
    import mindspore as ms
    import numpy as np
    from student.model import student_from_teacher

    student = student_from_teacher(random_teacher(seed), embed_dim=16, w_scale=1000.0)
    rng = np.random.default_rng(seed)
    for p in student.trainable_params():
        if "guidance_" in p.name:
            p.set_data(ms.Tensor((p.asnumpy() + 0.3 * rng.standard_normal(p.shape)).astype(np.float32)))
    student.set_train(False)
    return student


def gap_teacher(seed: int = 0) -> UNet:
    """:func:`random_teacher` with its null class moved far from the others: a clear cond - uncond gap, so a
    student that has not learnt the guidance is measurably far from the CFG target."""
    import mindspore as ms
    import numpy as np

    teacher = random_teacher(seed)
    table = teacher.class_embed.embedding_table
    rows = table.asnumpy()
    rows[-1] += 2.0 * np.random.default_rng(seed).standard_normal(rows.shape[1]).astype(np.float32)
    table.set_data(ms.Tensor(rows))
    return teacher


def guidance_errors(out: Path, interval: tuple[float, float] | None = None) -> tuple[float, float]:
    """The weighted error against the CFG target (or, with ``interval``, the guidance-interval target) on 256
    inputs the training never sees, of the untrained student (the teacher's conditional model) and of the same
    student after 40 steps training its guidance layers alone on :func:`gap_teacher` (trained whole, Adam's first
    steps move a student that starts at the teacher more than 40 steps can learn back)."""
    import mindspore as ms
    import numpy as np
    from distill.core import diffusion as dm
    from distill.core.data import load_data
    from student.distill import distill_inputs
    from teacher.guidance import GuidanceBranches

    def guidance_layer(name: str) -> bool:
        return any(part.startswith("guidance_") for part in name.split("."))

    _, student, teacher = distillation_run(out, interval, teacher=gap_teacher(), only=guidance_layer)
    data = load_data({"name": "digits", "max_train": 64})
    z, t, y, w, y_neg, alpha, sigma = distill_inputs(data, 256, 1, 500, "cosine", 0.0, 5.0)(500)
    tensors = [ms.Tensor(a) for a in (z, t, y, w, y_neg)]
    cond, uncond = (o.asnumpy() for o in GuidanceBranches(teacher)(*tensors))
    target = dm.interval_guided(cond, uncond, w, t, interval)
    weight = dm.output_space_weight("x_snr_trunc", "v", alpha, sigma).reshape(-1)

    def err(a: np.ndarray) -> float:  # the training loss's per-example weighting
        return float(np.mean(((a - target) ** 2).mean(axis=(1, 2, 3)) * weight))

    return err(cond), err(student(*tensors).asnumpy())


def distillation_run(out: Path, interval: tuple[float, float] | None = None, target: str = "cfg",
                     w_range: tuple[float, float] = (0.0, 5.0), teacher: UNet | None = None,
                     only: Callable[[str], bool] | None = None) -> tuple[list[float], UNet, UNet]:
    """(losses, trained student, teacher) of 40 steps distilling a tiny student from ``teacher`` (default
    :func:`random_teacher`) on 64 digits towards ``target`` (cfg, interval with ``interval``, or cfgpp: the
    two-head student), w in ``w_range``; ``only``: train just the parameters whose names it accepts."""
    from distill.core.data import load_data
    from distill.core.sampling import jit_predictor
    from distill.core.training import Trainer, TrainSettings
    from student.distill import distill_inputs, regression_batch, teacher_targets
    from student.model import student_from_teacher
    from teacher.guidance import GuidanceBranches
    from teacher.objective import regression_loss
    from teacher.unet import UNet

    data = load_data({"name": "digits", "max_train": 64})
    teacher = random_teacher() if teacher is None else teacher
    predict = jit_predictor(GuidanceBranches(teacher))
    student = student_from_teacher(teacher, embed_dim=16, w_scale=1000.0, uncond_head=target == "cfgpp")

    def batches(start: int):
        make = distill_inputs(data, 32, 0, start, "cosine", *w_range)

        def batch(step: int):
            inputs = make(step)
            return regression_batch(inputs, teacher_targets(predict, inputs, 1, interval, target), "x_snr_trunc", "v")
        return batch

    settings = TrainSettings(steps=40, batch_size=32, lr=3e-3, ema_decay=0.9, checkpoint_every=40, log_every=10)
    losses = Trainer(student, UNet(student.config), regression_loss, batches, settings, out, {"kind": "student"},
                     only=only).run()
    return losses, student, teacher


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> [(step, value), ...].

    Event files are TFRecord streams (length, length CRC, an ``Event`` protobuf, data CRC).
    """
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes beyond ``nbytes`` fail for real with EFBIG, root included: the file system refuses the bytes
    as a full disk does (ENOSPC), with no mock of the writer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
