"""The image UNet: shapes, zero output at init, conditioning, gradients, and config checks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from diffexp.networks.unet import UNet
from tests.helpers import ROOT, conf_options

CONF = ROOT / "conf" / "network"
TINY = {
    "base_channels": 8,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "num_groups": 4,
}


def _tiny(in_channels: int = 1, image_size: int = 8, **kw) -> UNet:
    """A tiny UNet for fast CPU tests (attention only in the middle unless told otherwise)."""
    cfg = {**TINY, "attention_resolutions": (), **kw}
    return UNet(in_channels, image_size, **cfg)


def _unzero(net: UNet) -> UNet:
    """Give the zero-initialised output conv random weights, so the output depends on inputs."""
    torch.manual_seed(1)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    torch.nn.init.normal_(net.out.bias, std=0.1)
    return net


@pytest.mark.parametrize(
    "channels,size,kw",
    [
        (1, 8, {}),
        (1, 16, {"attention_resolutions": (16,)}),
        (3, 32, {"channel_mults": (1, 2, 2), "attention_resolutions": (16,)}),
        (2, 12, {"num_heads": 2}),
        (3, 4, {"channel_mults": (1,)}),
    ],
)
def test_output_shape_equals_input_shape(channels, size, kw):
    net = _unzero(_tiny(channels, size, **kw))
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.randn(3) * 5)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert (net.in_channels, net.image_size, net.num_classes) == (channels, size, 0)


def test_output_is_zero_at_init():
    torch.manual_seed(0)
    net = _tiny(1, 16, attention_resolutions=(16,), num_classes=3)
    out = net(torch.randn(4, 1, 16, 16), torch.linspace(-15, 15, 4), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out, torch.zeros_like(out))


def test_log_snr_conditioning_changes_the_output():
    torch.manual_seed(0)
    net = _unzero(_tiny()).eval()
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    out = net(x, torch.tensor([-10.0, 0.0, 10.0]))
    assert not torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[1], out[2], atol=1e-5)


def test_label_conditioning_and_null_token():
    torch.manual_seed(0)
    net = _unzero(_tiny(num_classes=3)).eval()
    assert net.num_classes == 3
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    log_snr = torch.zeros(4)
    out = net(x, log_snr, torch.tensor([0, 1, 2, 3]))
    for i in range(3):
        assert not torch.allclose(out[i], out[i + 1], atol=1e-5)
    null = net(x, log_snr, torch.full((4,), 3))
    torch.testing.assert_close(net(x, log_snr, None), null)
    torch.testing.assert_close(null[0], out[3])


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = _unzero(_tiny(1, 16, attention_resolutions=(16, 8), num_classes=2, dropout=0.1))
    out = net(torch.randn(4, 1, 16, 16), torch.randn(4) * 5, torch.tensor([0, 1, 2, 0]))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_image_size_the_downsampling_cannot_take_is_refused():
    with pytest.raises(ValueError) as err:
        _tiny(1, 28, channel_mults=(1, 2, 2, 2))
    msg = str(err.value)
    assert "multiple of 8" in msg and "channel_mults" in msg and "resize" in msg
    assert "at most 3 entries" in msg  # 28 can be halved twice
    with pytest.raises(ValueError, match="multiple of 2"):
        _tiny(1, 9)


def test_attention_resolution_that_never_occurs_is_refused():
    with pytest.raises(ValueError) as err:
        _tiny(1, 16, attention_resolutions=(4,))
    msg = str(err.value)
    assert "[4]" in msg and "[16, 8]" in msg


def test_channels_not_divisible_by_num_groups_is_refused():
    with pytest.raises(ValueError, match="num_groups"):
        _tiny(1, 8, base_channels=6, num_groups=4)


def test_wrong_input_shape_is_refused():
    net = _tiny(1, 8)
    for shape in [(2, 3, 8, 8), (2, 1, 16, 16), (2, 1, 8, 4), (2, 64)]:
        with pytest.raises(ValueError, match=r"\[batch, 1, 8, 8\]"):
            net(torch.randn(*shape), torch.zeros(2))


# (channels, size) each UNet preset is built at: a new preset needs its row here
UNET_SIZES = {"unet": [(3, 32)], "unet_small": [(1, 8), (1, 16)]}


def test_every_unet_preset_is_tested():
    assert set(UNET_SIZES) == {n for n in conf_options("network") if n.startswith("unet")}


@pytest.mark.parametrize("name", sorted(UNET_SIZES))
def test_presets_build(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert cfg.pop("_target_") == "diffexp.networks.unet.UNet"
    # filled from the data module (num_classes only for a conditional network, else 0)
    assert cfg["in_channels"] is None and cfg["image_size"] is None and cfg["num_classes"] is None
    sizes = UNET_SIZES[name]
    for channels, size in sizes:
        net = UNet(**{**cfg, "in_channels": channels, "image_size": size, "num_classes": 0})
        n_params = sum(p.numel() for p in net.parameters())
        print(f"network={name} at {channels}x{size}x{size}: {n_params:,} parameters")
        if name == "unet_small":
            assert n_params < 2_000_000
            out = net(torch.randn(2, channels, size, size), torch.zeros(2))
            assert out.shape == (2, channels, size, size)
