"""eval on the oracle: the metrics a user reads, checked against the mixture's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from diffexp.cli import ConfigError
from diffexp.eval import evaluate
from diffexp.sample import sample


def test_oracle_eval_reports_elbo_ode_likelihood_and_sample_metrics(compose, tmp_path):
    cfg = compose(
        [
            "n_t=8",
            "n_samples=2000",
            "sampler=ode",
            "sampler.steps=50",
            "ode_likelihood.n_examples=64",
        ],
        name="eval",
    )
    m = evaluate(cfg)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "samples.png").is_file()
    total = m["reconstruction_nats"] + m["prior_nats"] + m["diffusion_nats"]
    assert m["elbo_nats"] == pytest.approx(-total, abs=1e-9)
    assert abs(m["elbo_gap_nats"]) < 4 * m["elbo_gap_nats_se"] + 0.02  # the oracle is exact
    # the PF-ODE likelihood of the exact denoiser is the true log-likelihood (same examples)
    assert m["ode_log_likelihood_nats"] == pytest.approx(
        m["ode_true_log_likelihood_nats"], abs=0.02
    )
    assert m["sliced_wasserstein"] < 1.5 * m["sliced_wasserstein_floor"]
    assert abs(m["sample_log_density_gap_nats"]) < 0.1
    assert 0 < m["sample_kl_floor_nats"] < 0.08  # exact-sample floor at n = 2000: 0.040 +- 0.008
    assert m["sample_kl_nats"] < m["sample_kl_floor_nats"] + 0.05  # ~4 sd of the difference


def test_guided_sampling_of_one_label_lands_on_its_component(compose):
    cfg = compose(
        ["guidance=classifier", "label=5", "n_samples=400", "sampler=ddim", "sampler.steps=50"],
        name="sample",
    )
    data = np.load(sample(cfg))
    means = np.array(
        [[2 * np.cos(2 * np.pi * k / 8), 2 * np.sin(2 * np.pi * k / 8)] for k in range(8)]
    )
    nearest = ((data["x"][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (data["y"] == 5).all()
    assert (nearest == nearest[0]).mean() > 0.99  # all on one component: the one for label 5


def test_cfg_on_an_unconditional_oracle_is_refused(compose):
    cfg = compose(["guidance=cfg", "n_samples=10", "data=swissroll"], name="sample")
    with pytest.raises(ConfigError):
        sample(cfg)


def test_labels_list_is_cycled(compose):
    cfg = compose(
        ["guidance=classifier", "labels=[1,6]", "n_samples=6", "sampler=ddim", "sampler.steps=5"],
        name="sample",
    )
    assert np.load(sample(cfg))["y"].tolist() == [1, 6, 1, 6, 1, 6]
    bad = compose(["guidance=classifier", "label=9", "n_samples=2"], name="sample")
    with pytest.raises(ConfigError, match="label=9: 9 is not a class of this data"):
        sample(bad)


def test_estimator_report_agrees_on_the_bound_and_differs_in_spread(compose):
    """The forms at T = 10 and three schedules with equal endpoints: one bound, many spreads."""
    cfg = compose(
        [
            "n_t=1",
            "n_samples=0",
            "estimators.forms_T=[10]",
            "estimators.schedules=[own,cosine,linear]",
            "estimators.n_repeats=2",
        ],
        name="eval",
    )
    m = evaluate(cfg)

    def agree(key: str) -> bool:  # paired with the first estimator of its group
        return abs(m[f"{key}/nll_diff_mean"]) < 4 * m[f"{key}/nll_diff_se"]

    assert agree("forms/T10/consistency") and agree("forms/T10/consistency_sampled_middle")
    assert agree("schedules/cosine") and agree("schedules/linear")
    # drawing z_i adds noise to the consistency terms; a fixed example's noise is most of the std
    assert (
        m["forms/T10/consistency_sampled_middle/nll_noise_std"]
        > (m["forms/T10/consistency/nll_noise_std"])
    )
    # log-linear spreads the ELBO's weight evenly in t: far less noise than DDPM's linear
    assert m["schedules/linear/nll_noise_std"] > 2 * m["schedules/own/nll_noise_std"]
    assert m["n_examples"] == 5000


def test_estimator_report_rejects_unknown_schedules(compose):
    cfg = compose(["n_samples=0", "estimators.schedules=[learned]"], name="eval")
    with pytest.raises(ValueError, match="valid: own, cosine, linear, log_linear, rectified_flow"):
        evaluate(cfg)


def test_steps_overrides_the_samplers_number_of_steps(compose):
    cfg = compose(["n_t=1", "n_samples=64", "sampler=ddim", "steps=7"], name="eval")
    assert evaluate(cfg)["nfe"] == 7  # DDIM: one network evaluation per step


def test_a_label_for_an_unconditional_unguided_model_is_refused(compose, tmp_path):
    cfg = compose(["label=3", "n_samples=4"], name="sample")
    with pytest.raises(ConfigError, match="label=3 .* unconditional"):
        sample(cfg)
    assert not (tmp_path / "samples.npz").exists()


def test_guidance_is_checked_before_the_elbo(compose, monkeypatch):
    import diffexp.eval as eval_module

    def no_elbo(*args, **kwargs):
        raise AssertionError("the ELBO ran before the refusal")

    monkeypatch.setattr(eval_module, "elbo_report", no_elbo)
    cfg = compose(["guidance=classifier", "labels=[8]", "n_t=1"], name="eval")
    with pytest.raises(ConfigError, match=r"labels=\[8\]: 8 is not a class"):
        evaluate(cfg)
