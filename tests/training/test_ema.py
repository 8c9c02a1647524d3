"""The EMA of the weights: torch's AveragedModel EMA bit for bit, its checkpoints, devices and
pickling."""

from __future__ import annotations

import pickle

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffexp.training.ema import EMA


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
