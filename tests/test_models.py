"""Model presets (conf/model/*.yaml): each builds at its data set's size, runs one forward pass at
batch 1 and has the parameter count and FLOPs docs/models.md states; attention sits where the preset
says; the default model (and the checkpoints made with it) is unchanged."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest

from conftest import compose_cfg
from distill.core.errors import UserError
from teacher.flops import forward_flops
from teacher.unet import Attention, ResBlock, UNet, UNetConfig, count_parameters

# preset -> (channels, image size, parameters as a teacher, GFLOP per forward pass as in docs/models.md,
#            res blocks followed by attention)
PRESETS = {
    "unet_small": (1, 8, 652_449, 0.0306, 0),
    "unet_32": (3, 32, 35_751_939, 12.44, 5),      # DDPM CIFAR-10: 2 down + 3 up blocks at 16x16
    "unet_64": (3, 64, 121_066_115, 79.44, 14),    # improved DDPM ImageNet-64: 3 down + 4 up at 16x16 and at 8x8
}


def preset_config(tmp_path, name: str) -> UNetConfig:
    channels, size, *_ = PRESETS[name]
    cfg = compose_cfg(tmp_path, f"model={name}", tiny=False)
    return UNetConfig.from_dict(dict(cfg.model, in_channels=channels, image_size=size, num_classes=10))


def forward_once(net: UNet, channels: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((1, channels, size, size)).astype(np.float32))
    one = ms.Tensor(np.ones(1, np.float32))
    return net(x, one * 0.5, ms.Tensor(np.array([3], np.int32)), one).asnumpy()


@pytest.mark.parametrize("name", ["unet_small", "unet_32", pytest.param("unet_64", marks=pytest.mark.slow)])
def test_preset_builds_and_runs_one_forward_pass(tmp_path, name: str) -> None:
    channels, size, params, gflop, attention_blocks = PRESETS[name]
    net = UNet(preset_config(tmp_path, name))
    net.set_train(False)
    assert count_parameters(net) == params
    assert sum(isinstance(c, ResBlock) and c.has_attention for _, c in net.cells_and_names()) == attention_blocks
    out = forward_once(net, channels, size)
    assert out.shape == (1, channels, size, size) and np.all(np.isfinite(out))
    assert forward_flops(net, (channels, size, size), 10)["total"] / 1e9 == pytest.approx(gflop, rel=2e-3)


def test_attention_follows_the_blocks_at_the_listed_sizes() -> None:
    cfg = UNetConfig(channels=8, channel_mult=(1, 2, 2), groups=4, image_size=16, attention=False,
                     attention_resolutions=(8,))
    net = UNet(cfg)
    sizes = cfg.feature_sizes()
    assert sizes == [16, 8, 4]
    with_attention = [name for name, c in net.cells_and_names() if isinstance(c, ResBlock) and c.has_attention]
    # level 1 (8x8): one block down, two up (num_res_blocks + 1)
    assert with_attention == ["down.2", "up.3", "up.4"], with_attention
    assert len([c for _, c in net.cells_and_names() if isinstance(c, Attention)]) == 3
    x = ms.Tensor(np.zeros((2, 1, 16, 16), np.float32))
    one = ms.Tensor(np.ones(2, np.float32))
    assert net(x, one, ms.Tensor(np.zeros(2, np.int32)), one).shape == (2, 1, 16, 16)
    # the backbone given the conditioning equals the forward pass (the sampler relies on the split)
    y = ms.Tensor(np.array([1, 2], np.int32))
    np.testing.assert_array_equal(net.backbone(x, net.conditioning(one * 0.3, y, one)).asnumpy(),
                                  net(x, one * 0.3, y, one).asnumpy())


def test_the_default_model_and_its_stored_dict_are_unchanged(tmp_path) -> None:
    cfg = compose_cfg(tmp_path, tiny=False)
    ucfg = UNetConfig.from_dict(dict(cfg.model, in_channels=1, image_size=8, num_classes=10))
    stored = ucfg.to_dict()
    assert "attention_resolutions" not in stored  # the dict checkpoints made before the option hold
    assert UNetConfig.from_dict(stored) == ucfg
    names = [p.name for p in UNet(ucfg).trainable_params()]
    assert not [n for n in names if ".attn." in n] and len(names) == 111  # as before the option existed


def test_attention_at_a_size_the_unet_does_not_have_is_refused() -> None:
    with pytest.raises(UserError, match=r"attention_resolutions \[16\]: 16 is not a feature-map size .*sizes 8, 4"):
        UNet(UNetConfig(image_size=8, channel_mult=(1, 2), attention_resolutions=(16,)))
