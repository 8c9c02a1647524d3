"""Guidance against the oracle: the w = 0 / w = 1 identities and exact classifier guidance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import diffuse
from diffexp.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from diffexp.networks import Oracle, OracleClassifier
from tests.helpers import ENDS, F64, conf_option, conf_options


def _conditional_oracle(param="eps"):
    mixture = make_mixture("ring8").to(dtype=F64)
    p = conf_option("parameterization", param)
    return Denoiser(Oracle(mixture, p, conditional=True), p, S.Cosine(**ENDS)).double(), mixture


def _batch(mixture, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, y = mixture.sample(n, generator=g)
    lam = torch.rand(n, generator=g, dtype=F64) * 16 - 7
    return diffuse(x0, lam, torch.randn(x0.shape, generator=g, dtype=F64)), y, lam


class _Counting(nn.Module):
    """Counts network calls."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.num_classes = net.num_classes

    def forward(self, x_t, log_snr, y=None):
        self.calls += 1
        return self.net(x_t, log_snr, y)


@pytest.mark.parametrize("param", conf_options("parameterization"))
def test_cfg_w0_is_unconditional_and_w1_is_conditional(param):
    den, mixture = _conditional_oracle(param)
    x_t, y, lam = _batch(mixture)
    null = torch.full_like(y, mixture.num_components)
    uncond = den(x_t, y=null, log_snr=lam)
    cond = den(x_t, y=y, log_snr=lam)
    for w, expected in ((0.0, uncond), (1.0, cond)):
        guided = ClassifierFreeGuidance(den, w, null_label=mixture.num_components)
        out = guided(x_t, y=y, log_snr=lam)
        torch.testing.assert_close(out.eps_hat, expected.eps_hat, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.x0_hat, expected.x0_hat, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.score, expected.score, rtol=1e-10, atol=1e-10)
    # and the unconditional branch really is the mixture's unconditional score
    torch.testing.assert_close(uncond.score, mixture.score(x_t, lam))
    torch.testing.assert_close(cond.score, mixture.score(x_t, lam, y=y))


def test_cfg_makes_one_batched_network_call():
    den, mixture = _conditional_oracle()
    den.network = _Counting(den.network)
    x_t, y, lam = _batch(mixture, n=8)
    ClassifierFreeGuidance(den, 3.0, null_label=8)(x_t, y=y, log_snr=lam)
    assert den.network.calls == 1


def test_cfg_interval_guides_inside_and_is_the_conditional_model_outside():
    """Per example: w inside [lambda_lo, lambda_hi], the plain conditional eps outside; a batch
    with no example inside calls only the conditional branch (half the network's work)."""
    den, mixture = _conditional_oracle()
    x_t, y, lam = _batch(mixture)
    null = mixture.num_components
    plain = ClassifierFreeGuidance(den, 3.0, null_label=null)(x_t, y=y, log_snr=lam)
    cond = den(x_t, y=y, log_snr=lam)
    out = ClassifierFreeGuidance(den, 3.0, null_label=null, interval=(-2.0, 4.0))
    out = out(x_t, y=y, log_snr=lam)
    inside = (lam >= -2.0) & (lam <= 4.0)
    assert 0 < int(inside.sum()) < len(lam)
    torch.testing.assert_close(out.eps_hat[inside], plain.eps_hat[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps_hat[~inside], cond.eps_hat[~inside], rtol=0, atol=1e-12)
    den.network = _Counting(den.network)
    outside = torch.full_like(lam, 6.0)
    guided = ClassifierFreeGuidance(den, 3.0, null_label=null, interval=(-2.0, 4.0))
    out = guided(x_t, y=y, log_snr=outside)
    assert den.network.calls == 1 and den.network.net  # one call, of the conditional branch
    torch.testing.assert_close(out.eps_hat, den(x_t, y=y, log_snr=outside).eps_hat)
    from diffexp.build.runs import describe_guidance

    named = describe_guidance(guided, den)  # what eval's metrics.json records
    assert named == "ClassifierFreeGuidance(scale=3.0, interval=[-2.0, 4.0])", named


def test_classifier_guidance_with_the_exact_classifier_and_w1_is_the_conditional_score():
    den, mixture = _conditional_oracle()
    x_t, y, lam = _batch(mixture, seed=1)
    guided = ClassifierGuidance(den, OracleClassifier(mixture), scale=1.0)
    out = guided(x_t, y=y, log_snr=lam)  # base called without y: the unconditional model
    torch.testing.assert_close(out.score, mixture.score(x_t, lam, y=y), rtol=1e-8, atol=1e-8)
    # w = 0 leaves the unconditional score
    out0 = ClassifierGuidance(den, OracleClassifier(mixture), scale=0.0)(x_t, y=y, log_snr=lam)
    torch.testing.assert_close(out0.score, mixture.score(x_t, lam), rtol=1e-10, atol=1e-10)


def test_guidance_without_labels_is_a_clear_error():
    den, mixture = _conditional_oracle()
    x_t, _, lam = _batch(mixture, n=4)
    with pytest.raises(ValueError, match="needs labels"):
        ClassifierFreeGuidance(den, 2.0, null_label=8)(x_t, log_snr=lam)
    with pytest.raises(ValueError, match="needs labels"):
        ClassifierGuidance(den, OracleClassifier(mixture), 1.0)(x_t, log_snr=lam)


# --- guidance in the framework: configs, training with label dropout, refusals ---------------


from diffexp.build.factory import build_datamodule, build_module  # noqa: E402
from diffexp.cli import ConfigError  # noqa: E402
from diffexp.train import train  # noqa: E402


@pytest.mark.parametrize("interval", ["[4,-2]", "[1]", "[a,b]", "3"])
def test_a_bad_guidance_interval_is_refused_before_compute(compose, interval):
    from diffexp.build.checks import check_train

    cfg = compose(["guidance=cfg", f"guidance.interval={interval}"])
    with pytest.raises(ConfigError, match=r"guidance.interval=.*lambda_lo < lambda_hi"):
        check_train(cfg)
    check_train(compose(["guidance=cfg", "guidance.interval=[-2,4]"]))


def test_guidance_on_unlabelled_data_stops_at_once(compose):
    for guidance in ("cfg", "classifier"):
        cfg = compose(["data=swissroll", f"guidance={guidance}"])
        with pytest.raises(ConfigError, match="needs a labelled data set"):
            build_module(cfg, build_datamodule(cfg.data))


def test_cfg_training_drops_labels_to_the_null_token(compose):
    cfg = compose(["guidance=cfg", "guidance.p_uncond=0.25"])
    module = build_module(cfg, build_datamodule(cfg.data))
    assert module.denoiser.network.num_classes == 8  # conditional on the ring's components
    torch.manual_seed(0)
    y = module.drop_labels(torch.zeros(20000, dtype=torch.long))
    assert set(y.unique().tolist()) == {0, 8}
    assert abs((y == 8).float().mean().item() - 0.25) < 0.01


def test_cfg_fast_dev_run(compose):
    train(compose(["debug=fdr", "guidance=cfg"]))


def test_sample_refuses_a_bad_interval_from_the_command_line(tmp_path):
    """As users type it: exit 2, one line naming the key and the fix, no traceback."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args = ["network=oracle", "guidance=cfg", "guidance.interval=[4,-2]", "label=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffexp.sample", *args, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: guidance.interval=[4, -2]" in proc.stderr and "Traceback" not in proc.stderr
