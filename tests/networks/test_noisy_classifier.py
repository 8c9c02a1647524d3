"""Noisy classifiers for classifier guidance: shapes, log-SNR conditioning, a short training run
on mixture1d checked against the exact classifier log p(y | x_t), checkpoint loading, errors."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import MissingConfigException

from diffexp.build.factory import build_datamodule
from diffexp.cli import ConfigError
from diffexp.diffusion.elbo import diffuse
from diffexp.diffusion.schedules import Learned, LogLinear
from diffexp.networks.classifier import (
    NoisyConvClassifier,
    NoisyMLPClassifier,
    auto_noisy_classifier,
    classifier_spec,
)
from diffexp.train_classifier import build_classifier, train_noisy_classifier
from diffexp.training.classifier_module import (
    NoisyClassifierModule,
    build_classifier_from_spec,
    load_noisy_classifier,
)
from tests.helpers import compose_config, conf_options

# measured KL(p || p_phi) at log-SNR in [5, 10] after the run below: 2e-4 .. 8e-4 nats (seeds
# 0-3); predicting the label prior alone gives about 0.6 nats
HIGH_SNR_KL_BOUND = 5e-3
# over the whole trained range [-8, 10]: measured 6e-4 .. 1e-3 nats
ALL_SNR_KL_BOUND = 1e-2


def test_classifier_shapes():
    mlp = NoisyMLPClassifier(dim=3, num_classes=5, width=32, depth=2)
    assert mlp(torch.randn(4, 3), torch.zeros(4)).shape == (4, 5)
    assert mlp.num_classes == 5
    for size in (8, 16, 28, 32):
        conv = NoisyConvClassifier(in_channels=3, image_size=size, num_classes=10, base_channels=8)
        assert conv(torch.randn(2, 3, size, size), torch.zeros(2)).shape == (2, 10)
        assert conv.num_classes == 10
    # a scalar log-SNR serves the whole batch
    assert mlp(torch.randn(4, 3), torch.tensor(1.0)).shape == (4, 5)


def test_wrong_shapes_are_refused_clearly():
    mlp = NoisyMLPClassifier(dim=2, num_classes=3, width=16, depth=1)
    with pytest.raises(ValueError, match=r"shape \[batch, 2\].*NoisyConvClassifier"):
        mlp(torch.randn(4, 1, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="one entry per example"):
        mlp(torch.randn(4, 2), torch.zeros(3))
    conv = NoisyConvClassifier(in_channels=1, image_size=8, num_classes=10, base_channels=8)
    with pytest.raises(ValueError, match=r"\[batch, 1, 8, 8\].*NoisyMLPClassifier"):
        conv(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        NoisyMLPClassifier(dim=2, num_classes=1)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_log_snr_conditioning_changes_the_output_and_gradients_flow(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = NoisyMLPClassifier(dim=2, num_classes=4, width=32, depth=2), torch.randn(6, 2)
    else:
        net = NoisyConvClassifier(in_channels=1, image_size=8, num_classes=4, base_channels=8)
        x = torch.randn(6, 1, 8, 8)
    a, b = net(x, torch.full((6,), 5.0)), net(x, torch.full((6,), -5.0))
    assert (a - b).abs().max() > 1e-3
    # what classifier guidance computes: grad_x log p_phi(y | x_t), finite and non-zero
    x = x.clone().requires_grad_(True)
    log_p = torch.log_softmax(net(x, torch.zeros(6)), dim=-1)[:, 0].sum()
    (grad,) = torch.autograd.grad(log_p, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_module_refuses_unlabelled_batches_and_freezes_the_schedule():
    schedule = Learned(log_snr_max=10.0, log_snr_min=-8.0, hidden=8)
    module = NoisyClassifierModule(
        NoisyMLPClassifier(dim=2, num_classes=3, width=16, depth=1),
        schedule,
        optimizer=torch.optim.Adam,
    )
    assert not any(p.requires_grad for p in module.schedule.parameters())
    with pytest.raises(ValueError, match="classifier guidance needs a labelled data set"):
        module.training_step((torch.randn(8, 2),), 0)
    # the accuracy bands follow the schedule's range: [10, -8] has all four
    assert len(module.accuracy_bands()) == 4
    narrow = NoisyClassifierModule(module.classifier, LogLinear(10.0, -5.0), torch.optim.Adam)
    assert (-float("inf"), -5.0) not in narrow.accuracy_bands()


def test_unlabelled_data_is_a_config_error(compose):
    """The message names every labelled option of conf/data (found from num_classes) and no
    other."""
    cfg = compose(["data=swissroll", "debug=fdr"], name="train_classifier")
    with pytest.raises(ConfigError, match="labelled data set") as err:
        train_noisy_classifier(cfg)
    named = set(str(err.value).rsplit("data=", 1)[1].split(", "))
    labelled = {"ring8", "grid25", "mixture1d", "moons", "digits", "digits16", "mnist", "cifar10"}
    assert named == labelled


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffexp.train_classifier"):
        load_noisy_classifier(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="python -m diffexp.train_classifier"):
        load_noisy_classifier(tmp_path)  # a folder without checkpoints/last.ckpt


def test_conv_classifier_is_picked_for_images(compose):
    cfg = compose(
        ["data=digits", "debug=fdr", "classifier.base_channels=8"], name="train_classifier"
    )
    run = train_noisy_classifier(cfg)
    assert isinstance(run.module.classifier, NoisyConvClassifier)
    assert run.module.classifier.image_size == 8 and run.module.num_classes == 10


# (classifier option, data) -> the class it builds; auto picks from the data's shape
CLASSIFIER_OPTIONS = {
    ("auto", "ring8"): NoisyMLPClassifier,
    ("auto", "digits"): NoisyConvClassifier,
    ("mlp", "mixture1d"): NoisyMLPClassifier,
    ("conv", "digits16"): NoisyConvClassifier,
}


@pytest.mark.parametrize("option,data", sorted(CLASSIFIER_OPTIONS), ids=str)
def test_every_classifier_option_builds_from_the_data_and_round_trips_its_spec(
    compose, option, data
):
    cfg = compose([f"classifier={option}", f"data={data}"], name="train_classifier")
    assert "kind" not in cfg.classifier
    datamodule = build_datamodule(cfg.data)
    classifier = build_classifier(cfg.classifier, datamodule)
    assert type(classifier) is CLASSIFIER_OPTIONS[option, data]
    assert classifier.num_classes == datamodule.num_classes
    x = torch.randn(3, *datamodule.shape)
    # the spec is what a checkpoint stores; load_noisy_classifier rebuilds the classifier from it
    spec = classifier_spec(classifier)
    assert all(isinstance(v, (int, float, str)) for v in spec.values())
    rebuilt = build_classifier_from_spec(spec)
    rebuilt.load_state_dict(classifier.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, torch.zeros(3)), classifier(x, torch.zeros(3)))


def test_every_classifier_option_is_tested():
    """A new conf/classifier option needs its row in CLASSIFIER_OPTIONS."""
    assert {option for option, _ in CLASSIFIER_OPTIONS} == set(conf_options("classifier"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["classifier=mlp", "data=digits"],
            r"classifier NoisyMLPClassifier takes vectors.*\(1, 8, 8\)",
        ),
        (["classifier=conv", "data=ring8"], r"square images \[C, H, H\].*\(2,\).*classifier=mlp"),
    ],
)
def test_a_classifier_for_other_data_is_a_config_error(compose, overrides, message):
    cfg = compose(overrides, name="train_classifier")
    with pytest.raises(ConfigError, match=message):
        build_classifier(cfg.classifier, build_datamodule(cfg.data))


def test_auto_refuses_data_no_classifier_takes():
    with pytest.raises(ValueError, match=r"shape \(3, 8, 4\)"):
        auto_noisy_classifier((3, 8, 4), num_classes=10)


def test_an_unknown_classifier_option_lists_the_valid_ones(compose):
    with pytest.raises(MissingConfigException) as err:
        compose(["classifier=resnet"], name="train_classifier")
    assert all(option in str(err.value) for option in ("auto", "conv", "mlp"))


@pytest.fixture(scope="module")
def mixture1d_run(tmp_path_factory):
    """A short run on the 1-D two-component mixture (about 2 s on one CPU thread)."""
    out = tmp_path_factory.mktemp("classifier_run")
    overrides = [
        "data=mixture1d",
        "data.n_train=5120",
        "logger=csv",
        "classifier.width=64",
        "classifier.depth=2",
        "optimizer.lr=3e-3",
        "trainer.max_steps=300",
        "trainer.val_check_interval=300",
        "trainer.enable_progress_bar=false",
    ]
    return train_noisy_classifier(
        compose_config("train_classifier", [f"paths.output_dir={out}", *overrides])
    )


def test_training_beats_chance_at_high_snr(mixture1d_run):
    metrics = mixture1d_run.metrics
    # chance is 0.7 (the larger component's weight); the Bayes accuracy above log-SNR 5 is 0.999
    assert metrics["val/accuracy_band/5_to_inf"] > 0.97
    assert metrics["val/accuracy_band/0_to_5"] > 0.9
    assert metrics["val/accuracy"] > 0.8
    assert mixture1d_run.checkpoint.name == "last.ckpt"
    assert (mixture1d_run.checkpoint.parent.parent / "summary.json").is_file()


def test_checkpoint_loads_to_the_same_logits(mixture1d_run):
    loaded = load_noisy_classifier(mixture1d_run.checkpoint)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    trained = mixture1d_run.module.classifier.eval()
    x, lam = torch.randn(64, 1), torch.linspace(-8, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lam), trained(x, lam), rtol=0, atol=0)
    # a run folder works as well as its checkpoint
    run_dir = mixture1d_run.checkpoint.parent.parent
    with torch.no_grad():
        torch.testing.assert_close(load_noisy_classifier(run_dir)(x, lam), loaded(x, lam))


def _kl_to_the_exact_classifier(run, lo: float, hi: float) -> tuple[float, float, float]:
    """(mean KL(p || p_phi), cross-entropy gap, KL of the label prior) at log-SNR ~ U(lo, hi)."""
    mixture = run.datamodule.mixture
    classifier = run.module.classifier.eval()
    g = torch.Generator().manual_seed(1)
    x0, y = mixture.sample(20_000, g)
    log_snr = lo + (hi - lo) * torch.rand(len(x0), generator=g)
    x_t = diffuse(x0, log_snr, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        log_p_phi = torch.log_softmax(classifier(x_t, log_snr), dim=-1)
        log_p = mixture.responsibilities(x_t, log_snr)
    kl = (log_p.exp() * (log_p - log_p_phi)).sum(-1).mean()
    ce_gap = (log_p - log_p_phi).gather(1, y[:, None]).mean()
    log_prior = mixture.weights.log().to(log_p.dtype)
    kl_prior = (log_p.exp() * (log_p - log_prior)).sum(-1).mean()
    return float(kl), float(ce_gap), float(kl_prior)


def test_classifier_matches_the_exact_noisy_posterior(mixture1d_run):
    kl, ce_gap, kl_prior = _kl_to_the_exact_classifier(mixture1d_run, 5.0, 10.0)
    assert kl_prior > 100 * HIGH_SNR_KL_BOUND  # the bound tells a classifier from the prior
    assert 0.0 <= kl < HIGH_SNR_KL_BOUND
    assert abs(ce_gap) < HIGH_SNR_KL_BOUND
    kl, ce_gap, _ = _kl_to_the_exact_classifier(mixture1d_run, -8.0, 10.0)
    assert 0.0 <= kl < ALL_SNR_KL_BOUND
    assert abs(ce_gap) < ALL_SNR_KL_BOUND
