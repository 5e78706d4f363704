"""Runtime settings: fp16 (amp O2, dynamic loss scale, overflowing steps skipped), bf16 refused on CPU, jit options,
the data-parallel batch split, training values."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conftest import compose_cfg
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core import runtime
from distill.core.runtime import Runtime, check_jit_options, setup_from_config, setup_runtime
from distill.core.training import Trainer, TrainSettings
from distill.core.weights import net_state
from teacher.objective import regression_loss, teacher_batch_maker
from teacher.unet import UNet, UNetConfig

NET = UNetConfig(channels=8, channel_mult=(1, 2), groups=4, attention=False, image_size=8, num_classes=10)


def tiny_trainer(out: Path, steps: int, **settings) -> Trainer:
    data = load_data({"name": "digits", "max_train": 64})
    ms.set_seed(0)
    net, ema = UNet(NET), UNet(NET)
    settings = {"batch_size": 16, **settings}
    s = TrainSettings(steps=steps, lr=3e-3, ema_decay=0.9, checkpoint_every=2, log_every=2, **settings)
    batches = lambda start: teacher_batch_maker(data, 16, 0, start, "cosine", "v", 0.1)  # noqa: E731
    return Trainer(net, ema, regression_loss, batches, s, out, {"kind": "teacher", "model": NET.to_dict()})


def test_fp16_trains_on_cpu_with_finite_loss_and_keeps_ema_fp32(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, steps=6, precision="fp16")
    before = {k: v.copy() for k, v in net_state(trainer.net).items()}  # asnumpy() may share memory
    losses = trainer.run()
    assert len(losses) == 6 and np.all(np.isfinite(losses)) and trainer.skipped_steps == 0
    after = net_state(trainer.net)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert all(p.dtype == ms.float32 for p in trainer.net.trainable_params() + trainer.ema.trainable_params())
    # the loss scale is part of the checkpoint, so a resumed fp16 run continues with it
    from distill.core.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert meta["precision"] == "fp16" and float(tensors["amp.scale_value"]) == 2.0 ** 16


def test_fp16_steps_with_overflowing_gradients_are_skipped(tmp_path: Path) -> None:
    # A loss scale of 2^60 overflows every fp16 gradient: each step is skipped and the scale halves.
    trainer = tiny_trainer(tmp_path, steps=3, precision="fp16", loss_scale=2.0 ** 60)
    start = {k: v.copy() for k, v in net_state(trainer.net).items()}
    losses = trainer.run()
    assert np.all(np.isfinite(losses)) and trainer.skipped_steps == 3
    assert float(trainer.scaler.scale_value.asnumpy()) == 2.0 ** 57
    for k, v in net_state(trainer.net).items():
        np.testing.assert_array_equal(v, start[k], err_msg=k)  # weights untouched by skipped steps
    for k, v in net_state(trainer.ema).items():
        np.testing.assert_array_equal(v, start[k], err_msg=k)


def test_bf16_needs_ascend(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bf16 needs Ascend"):
        setup_runtime("CPU", 0, precision="bf16")
    with pytest.raises(UserError, match="bf16 needs Ascend"):
        tiny_trainer(tmp_path, steps=1, precision="bf16")
    with pytest.raises(UserError, match="precision 'fp8'"):
        setup_runtime("CPU", 0, precision="fp8")


def test_config_defaults_are_fp32_single_process(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path)
    assert cfg.precision == "fp32" and cfg.distributed is False
    rt = setup_from_config(cfg)
    assert (rt.precision, rt.distributed, rt.rank, rt.world_size, dict(rt.jit_options)) == ("fp32", False, 0, 1, {})


def test_cpu_max_isa_caps_onednn_unless_the_environment_already_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ONEDNN_ISA_ENV, raising=False)
    setup_runtime("CPU", 0, cpu_max_isa=None)
    assert runtime.ONEDNN_ISA_ENV not in runtime.os.environ
    setup_runtime("CPU", 0, cpu_max_isa="avx2")
    assert runtime.os.environ[runtime.ONEDNN_ISA_ENV] == "AVX2"
    monkeypatch.setenv(runtime.ONEDNN_ISA_ENV, "AVX512_CORE")
    setup_runtime("CPU", 0, cpu_max_isa="AVX2")
    assert runtime.os.environ[runtime.ONEDNN_ISA_ENV] == "AVX512_CORE"  # the user's own setting wins
    with pytest.raises(UserError, match="cpu_max_isa 'AVX3' is not one of"):
        setup_runtime("CPU", 0, cpu_max_isa="AVX3")
    with pytest.raises(UserError, match="cpu_max_isa 'AVX3' is not one of"):  # checked on every device
        runtime.check_cpu_isa("AVX3")


def test_graph_mode_options_are_checked() -> None:
    assert check_jit_options({"jit_level": "O1", "backend": None}) == {"jit_level": "O1"}
    with pytest.raises(UserError, match="jit_level 'O3'"):
        check_jit_options({"jit_level": "O3"})
    with pytest.raises(UserError, match="unknown option"):
        check_jit_options({"jit_levle": "O1"})


def test_distributed_without_a_launcher_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MS_ROLE", "RANK_TABLE_FILE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="needs a launcher: .*msrun"):
        setup_runtime("CPU", 0, distributed=True)


def test_train_settings_are_checked() -> None:
    with pytest.raises(UserError, match="steps must be an integer, not 'many'"):
        TrainSettings(steps="many", batch_size=16).validate()
    with pytest.raises(UserError, match="lr must be a number"):
        TrainSettings(steps=1, batch_size=16, lr="fast").validate()
    with pytest.raises(UserError, match="lr inf must be a finite number > 0"):
        TrainSettings(steps=1, batch_size=16, lr=float("inf")).validate()
    with pytest.raises(UserError, match="grad_clip"):
        TrainSettings(steps=1, batch_size=16, grad_clip=-1.0).validate()


def test_each_rank_takes_its_slice_of_the_global_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    batch = (np.arange(16).reshape(16, 1), np.arange(16) * 10)
    monkeypatch.setattr(runtime, "_current", Runtime(distributed=True, rank=1, world_size=2))
    x, y = runtime.shard(batch, 16)
    np.testing.assert_array_equal(x[:, 0], np.arange(8, 16))
    np.testing.assert_array_equal(y, np.arange(8, 16) * 10)
    assert runtime.shard((x, y), 16)[0] is x  # already this rank's share: passed through
    with pytest.raises(ValueError, match="leading size 5"):
        runtime.shard((np.zeros(5),), 16)
    with pytest.raises(UserError, match="batch_size 15 cannot be split evenly over 2"):
        tiny_trainer(tmp_path, steps=1, batch_size=15)


@pytest.mark.parametrize("threads", [0, -2, True])
def test_cpu_threads_must_be_a_positive_integer(threads: object) -> None:
    with pytest.raises(UserError, match="cpu_threads must be a positive integer"):
        setup_runtime("CPU", cpu_threads=threads)  # type: ignore[arg-type]
