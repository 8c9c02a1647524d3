"""The EMA of the weights: torch's AveragedModel EMA bit for bit, its checkpoints, devices and
pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffexp.training.ema import EMA, EMAWarmup


class _Net(nn.Module):
    """Two layers, a floating buffer and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([1.0, 2.0]))
        self.register_buffer("count", torch.tensor(0))


def _train_step(net: _Net, gen: torch.Generator) -> None:
    """Move every tensor of ``net``, as an optimizer step (and a buffer update) would."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        net.scale.mul_(1.5)
        net.count.add_(1)


def test_ema_equals_torchs_averaged_model_bit_for_bit_and_saves_the_same_state():
    gen = torch.Generator().manual_seed(0)
    net = _Net()
    ours = EMA(net, 0.9)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(5):
        _train_step(net, gen)
        ours.update(net)
        theirs.update_parameters(net)
        for (k, a), (k2, b) in zip(
            ours.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert k == k2
            if a.is_floating_point():
                assert torch.equal(a, b), k
    assert int(ours.n_averaged) == 5
    assert ours.module.count.item() == net.count.item()  # integer buffers are the model's
    # the closed form: after the first copy, ema_k = d ema_{k-1} + (1 - d) theta_k
    assert not torch.equal(ours.module.a.weight, net.a.weight)


def test_ema_resumes_from_a_checkpoint_of_itself_or_of_averaged_model():
    gen = torch.Generator().manual_seed(1)
    net = _Net()
    reference = EMA(net, 0.8)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    for _ in range(3):
        _train_step(net, gen)
        reference.update(net)
        theirs.update_parameters(net)
    for saved in (reference.state_dict(), theirs.state_dict()):
        resumed = EMA(_Net(), 0.8)
        resumed.load_state_dict(saved)
        continued = EMA(_Net(), 0.8)
        continued.load_state_dict(reference.state_dict())
        net2 = _Net()
        net2.load_state_dict(net.state_dict())
        _train_step(net2, torch.Generator().manual_seed(9))
        resumed.update(net2)  # a lerp, not a copy: the count came with the checkpoint
        continued.update(net2)
        assert torch.equal(resumed.module.a.weight, continued.module.a.weight)
        assert not torch.equal(resumed.module.a.weight, net2.a.weight)


def test_ema_follows_the_model_across_dtype_moves_and_pickles():
    gen = torch.Generator().manual_seed(2)
    net = _Net()
    ema = EMA(net, 0.5)
    _train_step(net, gen)
    ema.update(net)
    holder = nn.ModuleDict({"net": net, "ema": ema})  # as in the LightningModule
    holder.double()  # buffers are replaced, parameters keep their identity
    before = ema.module.scale.clone()
    _train_step(net, gen)
    ema.update(net)
    assert ema.module.scale.dtype == torch.float64
    torch.testing.assert_close(ema.module.scale, 0.5 * before + 0.5 * net.scale)
    clone = pickle.loads(pickle.dumps(ema))
    _train_step(net, gen)
    clone.update(net)
    ema.update(net)
    assert torch.equal(clone.module.b.bias, ema.module.b.bias)


# ---------------------------------------------------------------------- warm-up
def test_warmup_decay_follows_the_formula_and_the_ema_uses_it_update_by_update():
    warm = EMAWarmup(inv_gamma=1.0, power=2 / 3, min_decay=0.0)
    for n in (0, 1, 10, 100, 1000, 31_000, 10**6):
        expected = min(0.999, max(0.0, 1 - (1 + n / 1.0) ** (-2 / 3)))
        assert warm.decay(n, 0.999) == pytest.approx(expected, rel=1e-15, abs=0.0)
    assert warm.decay(0, 0.999) == 0.0 and warm.decay(10**6, 0.999) == 0.999  # capped
    # k-diffusion's landmarks: 0.999 at 31.6K steps (power 2/3), 0.999 at 10K (power 3/4)
    assert warm.decay(31_500, 1.0) < 0.999 < warm.decay(31_700, 1.0)
    assert (
        EMAWarmup(power=0.75).decay(9_950, 1.0) < 0.999 < EMAWarmup(power=0.75).decay(10_050, 1.0)
    )
    floor = EMAWarmup(inv_gamma=10.0, power=1.0, min_decay=0.5)
    assert floor.decay(1, 0.9) == 0.5 and floor.decay(20, 0.9) == pytest.approx(2 / 3)

    gen = torch.Generator().manual_seed(3)
    net = _Net()
    ema = EMA(net, 0.99, warmup=EMAWarmup(inv_gamma=2.0, power=0.75))
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    for n in range(6):
        _train_step(net, gen)
        assert ema.current_decay() == pytest.approx(min(0.99, 1 - (1 + n / 2.0) ** -0.75))
        d = ema.current_decay()
        ema.update(net)
        for k, v in net.state_dict().items():
            if v.is_floating_point():  # the recursion by hand (the first update copies)
                ref[k] = v.clone() if n == 0 else d * ref[k] + (1 - d) * v
        torch.testing.assert_close(ema.module.a.weight, ref["a.weight"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ema.module.scale, ref["scale"], rtol=1e-6, atol=1e-6)


def test_without_warmup_and_once_warmed_up_the_ema_is_bit_identical_to_a_fixed_decay():
    gen = torch.Generator().manual_seed(4)
    net = _Net()
    fixed, off = EMA(net, 0.9), EMA(net, 0.9, warmup=None)
    # inv_gamma tiny: the warm-up's decay exceeds 0.9 from the second update, so it is capped
    capped = EMA(net, 0.9, warmup=EMAWarmup(inv_gamma=1e-9, power=1.0))
    for _ in range(5):
        _train_step(net, gen)
        before = fixed.module.a.weight.clone()
        for ema in (fixed, off, capped):
            ema.update(net)
        for other in (off, capped):
            for a, b in zip(fixed.state_dict().values(), other.state_dict().values(), strict=True):
                assert torch.equal(a, b)
    # and the fixed decay is the lerp it always was
    assert torch.equal(fixed.module.a.weight, torch.lerp(before, net.a.weight, 1.0 - 0.9))


def test_warmup_resumes_exactly_from_the_checkpointed_count():
    gen = torch.Generator().manual_seed(5)
    net = _Net()
    warm = {"inv_gamma": 1.0, "power": 0.75, "min_decay": 0.0}  # a config mapping
    full = EMA(net, 0.999, warmup=warm)
    steps = []
    for _ in range(8):
        _train_step(net, gen)
        steps.append(copy.deepcopy(net.state_dict()))
    for s in steps[:4]:
        net.load_state_dict(s)
        full.update(net)
    resumed = EMA(_Net(), 0.999, warmup=warm)
    resumed.load_state_dict(pickle.loads(pickle.dumps(full.state_dict())))
    assert resumed.current_decay() == full.current_decay() == 1 - 5**-0.75
    for s in steps[4:]:
        net.load_state_dict(s)
        full.update(net)
        resumed.update(net)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "value,words",
    [
        ({"inv_gamma": -1.0}, "model.ema_warmup.inv_gamma=-1.0 is out of range"),
        ({"power": 0}, "model.ema_warmup.power=0 is out of range"),
        ({"min_decay": 1.0}, "model.ema_warmup.min_decay=1.0 is out of range"),
        ({"gamma": 1.0}, "model.ema_warmup.gamma is not a setting"),
        (0.5, "model.ema_warmup=0.5 is not a mapping"),
    ],
)
def test_a_bad_warmup_is_refused_naming_the_key(value, words):
    with pytest.raises(ValueError, match="model.ema_warmup") as err:
        EMAWarmup.of(value, "model.ema_warmup")
    assert words in str(err.value) and "model.ema_warmup=null" in str(err.value)


def test_the_config_reaches_the_modules_ema_and_a_bad_one_is_a_config_error(tmp_path):
    from diffexp.build.factory import build_datamodule, build_module
    from diffexp.cli import ConfigError
    from tests.helpers import compose_config

    def module(*overrides):
        cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *overrides])
        return build_module(cfg, build_datamodule(cfg.data))

    assert module().ema.warmup is None  # the default: off
    warm = module("model.ema_warmup={inv_gamma:1.0,power:0.75}").ema.warmup
    assert warm == EMAWarmup(inv_gamma=1.0, power=0.75, min_decay=0.0)
    with pytest.raises(ConfigError, match="model.ema_warmup.power=-1"):
        module("model.ema_warmup={power:-1}")
    with pytest.raises(ConfigError, match="model.ema_decay=null disables it"):
        module("model.ema_decay=null", "model.ema_warmup={power:0.75}")
