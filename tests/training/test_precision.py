"""bf16 with exact ELBO math: under autocast (``trainer.precision=bf16-mixed``) only the network
runs in bf16; the schedule, the parameterization's conversion, the KLs, the decoder and the
reductions run in float32. Checked on CPU autocast, which rounds exactly as a GPU's bf16 does.

The check is an identity, not a tolerance: the ELBO computed under autocast must equal, to the
last bit, the float32 ELBO computed on the bf16 network's outputs (replayed). Whatever differs
between bf16-mixed and float32 is then the network's own rounding, whose effect is bounded to
first order by sum_i |dELBO/d out_i| |delta out_i| (the ELBO is smooth in the network's output);
the second-order remainder is checked to be small against that bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffexp.build.checks import check_train
from diffexp.build.factory import ConfigError, build_datamodule, build_denoiser
from diffexp.diffusion.elbo import elbo_terms
from tests.helpers import conf_options


class Recorder(nn.Module):
    """The network, its outputs kept in call order."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.inner, self.outputs = network, []

    def forward(self, *args):
        out = self.inner(*args)
        self.outputs.append(out)
        return out


class Replay(nn.Module):
    """Returns given outputs in call order (float32), as the network would have."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, *args):
        out = self.outputs[self.i]
        self.i += 1
        return out


def _elbo(denoiser, x0, T: int, n_t: int, nll) -> torch.Tensor:
    terms = elbo_terms(
        denoiser,
        x0,
        T=T,
        n_t=n_t,
        generator=torch.Generator().manual_seed(1),
        reconstruction_nll=nll,
    )
    return terms.elbo


def _setup(compose, overrides: list[str], n: int):
    cfg = compose(overrides)
    torch.manual_seed(0)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    denoiser = build_denoiser(cfg, dm)
    with torch.no_grad():  # zero-initialized output layers would output 0 in any precision
        for p in denoiser.network.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x0 = torch.cat([b[0] if isinstance(b, list | tuple) else b for b in dm.val_dataloader()])[:n]
    nll = getattr(dm, "reconstruction_nll", None)
    return denoiser, x0, nll


CASES = [
    *[([f"parameterization={p}"], 0) for p in conf_options("parameterization")],
    (["parameterization=eps"], 20),  # a 20-step model
    (["parameterization=v", "schedule=learned"], 0),  # the schedule's own layers stay float32
    (["objective=flow"], 0),
]


@pytest.mark.parametrize("overrides,T", CASES, ids=lambda v: str(v))
def test_under_bf16_autocast_only_the_network_runs_in_bf16(compose, overrides, T):
    denoiser, x0, nll = _setup(compose, overrides, 256)
    kwargs = {} if nll is None else {"nll": nll}
    _check_bf16_elbo(denoiser, x0, T, n_t=4, **kwargs)


def test_the_discretized_decoder_under_bf16_autocast(compose):
    """8x8 digits with the small UNet: the reconstruction term is the discretized decoder's."""
    denoiser, x0, nll = _setup(compose, ["experiment=digits", "objective=vdm"], 16)
    assert nll is not None
    _check_bf16_elbo(denoiser, x0, 0, n_t=2, nll=nll)


def _check_bf16_elbo(denoiser, x0, T: int, n_t: int, nll=None) -> None:
    from diffexp.diffusion.elbo import gaussian_reconstruction_nll

    nll = nll or gaussian_reconstruction_nll
    network = denoiser.network
    with torch.no_grad():
        f32 = _elbo(denoiser, x0, T, n_t, nll)
        denoiser.network = Recorder(network)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _elbo(denoiser, x0, T, n_t, nll)
        outputs = denoiser.network.outputs
        assert all(o.dtype == torch.bfloat16 for o in outputs)  # the network did run in bf16
        denoiser.network = Replay([o.float() for o in outputs])
        replayed = _elbo(denoiser, x0, T, n_t, nll)
    # nothing after the network runs in bf16: the same float32 math on the same numbers
    torch.testing.assert_close(bf16, replayed, rtol=0, atol=0)
    # the difference to float32 is the network's rounding, to first order
    denoiser.network = Recorder(network)
    with torch.no_grad():
        _elbo(denoiser, x0, T, n_t, nll)
    exact = [o.detach().requires_grad_(True) for o in denoiser.network.outputs]
    denoiser.network = Replay(exact)
    _elbo(denoiser, x0, T, n_t, nll).sum().backward()
    delta = [o.float() - e.detach() for o, e in zip(outputs, exact, strict=True)]
    first_order = sum((e.grad * d).sum() for e, d in zip(exact, delta, strict=True))
    bound = sum((e.grad.abs() * d.abs()).sum() for e, d in zip(exact, delta, strict=True))
    gap = (bf16 - f32).sum()
    assert bound > 0
    assert abs(gap) <= bound * 1.01 + 1e-4
    # the remainder (second order in delta) is small against the first-order bound
    assert abs(gap - first_order) <= 0.1 * bound + 1e-4
    denoiser.network = network


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "8-bit"])
def test_precisions_that_cannot_hold_the_elbo_are_refused(compose, precision):
    with pytest.raises(ConfigError, match=f"trainer.precision='{precision}'"):
        check_train(compose([f"trainer.precision={precision}"]))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_supported_precisions_pass_the_check(compose, precision):
    check_train(compose([f"trainer.precision={precision}"]))


@pytest.mark.slow
def test_a_bf16_mixed_run_ends_at_the_float32_runs_elbo(compose, tmp_path):
    """1000 steps on the ring, no EMA, the same seed: bf16-mixed perturbs each step's gradient by
    the network's rounding (relative 2^-8), so the two runs drift apart like two runs of nearby
    seeds would; validation draws the same noise in both, so the difference is paired. Measured
    at 1500 steps (with the EMA): -3.6776 against -3.6656 nats, 0.012 apart; 0.05 nats is a
    bound well below the run's distance to the true log-likelihood (over 1 nat at this length)."""
    from diffexp.train import train

    common = ["trainer.max_steps=1000", "model.ema_decay=null", "logger=csv"]
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        out = f"paths.output_dir={tmp_path / precision}"
        runs[precision] = train(compose([*common, out, f"trainer.precision={precision}"]))
    f32, bf16 = runs["32-true"], runs["bf16-mixed"]
    assert bf16["val/elbo_nats"] == pytest.approx(f32["val/elbo_nats"], abs=0.05)
    assert f32["val/elbo_nats"] != bf16["val/elbo_nats"]  # the network did run in bf16
