"""FID / KID through feature extractors: the digits classifier, InceptionV3 plumbing, DDP state."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from diffexp.metrics.features import (
    INCEPTION_FILENAME,
    DigitsClassifier,
    InceptionFeatures,
    build_feature_extractor,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffexp.metrics.fid import FIDMetric, extract_features, fid_kid
from diffexp.train_features import load_digits_images, train_features, upsample_nearest

LEVELS = [0.05, 0.1, 0.2, 0.4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models on shared cores: one torch thread is fastest (and modest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits, 8 x 8, in [-1, 1]: train and val splits."""
    return load_digits_images(8, val_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def classifier(digits):
    """A digits classifier trained for a few seconds, and its val accuracy."""
    x, y, xv, yv = digits
    return train_classifier(x, y, xv, yv, epochs=10, seed=0)


@pytest.fixture(scope="module")
def extractor(classifier):
    return classifier[0].as_feature_extractor()


@pytest.fixture(scope="module")
def real(digits):
    x, _, xv, _ = digits
    return torch.cat([x, xv])


@pytest.fixture(scope="module")
def noise(real):
    return torch.randn(real.shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A *randomly initialized* InceptionV3 state_dict on disk: this checks the path plumbing,
    not the real FID weights (which are never downloaded in tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(
            tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = tf_inception.FeatureExtractorInceptionV3("random", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch the Inception weights fails the test at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


# --- the classifier ---------------------------------------------------------------------------


def test_classifier_reaches_90_percent_on_digits(classifier):
    model, acc = classifier
    assert acc > 0.90
    assert model.image_size == 8 and not model.training


def test_classifier_is_deterministic_given_the_seed(digits, classifier):
    x, y, xv, yv = digits
    again, acc = train_classifier(x[:200], y[:200], xv, yv, epochs=1, seed=3)
    once_more, acc2 = train_classifier(x[:200], y[:200], xv, yv, epochs=1, seed=3)
    assert acc == acc2
    assert torch.equal(again(xv[:8]), once_more(xv[:8]))


def test_save_load_round_trip_is_exact_and_weights_only(tmp_path, monkeypatch, classifier, digits):
    model, acc = classifier
    path = save_classifier(model, tmp_path / "sub" / "digits8_classifier.pt", {"dataset": "digits"})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))  # atomic: no temp file left
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_classifier(path)
    assert calls == [True]
    payload = real_load(path, weights_only=True)
    assert payload["config"] == model.config
    assert payload["meta"]["dataset"] == "digits" and payload["meta"]["image_size"] == 8
    assert "date" in payload["meta"]
    xv = digits[2][:64]
    assert torch.equal(loaded(xv), model(xv))
    assert torch.equal(loaded.features(xv), model.features(xv))
    assert loaded.name == "digits8_classifier" and loaded.meta["dataset"] == "digits"


def test_missing_classifier_file_says_which_command_creates_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffexp.train_features image_size=16"):
        load_classifier(tmp_path / "digits16_classifier.pt")


def test_classifier_features_reject_the_wrong_image_size(extractor):
    assert extractor.num_features == 128 and not extractor.training
    extractor.train()
    assert not extractor.training  # stays in eval mode
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        extractor(torch.zeros(2, 1, 16, 16))


def test_upsampling_repeats_pixels():
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    up = upsample_nearest(x, 8)
    assert torch.equal(up, torch.nn.functional.interpolate(x, size=8, mode="nearest"))
    assert DigitsClassifier(image_size=32)(up.repeat(1, 1, 4, 4)).shape == (2, 10)


# --- FID / KID --------------------------------------------------------------------------------


def test_fid_is_zero_for_identical_sets_and_grows_with_noise_and_shift(extractor, real, noise):
    same = fid_kid(real, real, extractor, kid_subsets=2)
    assert same["n_real"] == same["n_fake"] == len(real)
    assert same["extractor"] == extractor.name
    by_noise = [fid_kid(real, real + s * noise, extractor, kid_subsets=2)["fid"] for s in LEVELS]
    by_shift = [fid_kid(real, real + s, extractor, kid_subsets=2)["fid"] for s in LEVELS]
    assert abs(same["fid"]) < 1e-3 * by_noise[0]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:], strict=False)), by_noise
    assert all(a < b for a, b in zip(by_shift, by_shift[1:], strict=False)), by_shift


def test_kid_is_about_zero_for_identical_sets(extractor, real, noise):
    """With one subset holding every image, KID of a set with itself is the U-statistic's
    known artifact -(2 / m) (mean k(x, x) - mean_{x != y} k(x, y)): small (it shrinks as 1 / m)
    next to a noisy copy's; two disjoint halves of the data give KID within its spread of 0."""
    m = len(real)
    same = fid_kid(real, real, extractor, kid_subset_size=m, kid_subsets=2)["kid_mean"]
    noisy = fid_kid(real, real + 0.4 * noise, extractor, kid_subset_size=m, kid_subsets=2)
    f = extract_features(real, extractor).double()
    k = (f @ f.T / f.shape[1] + 1.0) ** 3
    off_diagonal = (k.sum() - k.diagonal().sum()) / (m * (m - 1))
    assert same == pytest.approx(float(-2.0 / m * (k.diagonal().mean() - off_diagonal)), rel=1e-3)
    assert abs(same) < 0.05 * noisy["kid_mean"]
    half = fid_kid(real[::2], real[1::2], extractor, kid_subset_size=500, kid_subsets=20)
    assert abs(half["kid_mean"]) < 3 * half["kid_std"]


def test_fid_metric_matches_fid_kid(extractor, real, noise):
    fake = real + 0.1 * noise
    metric = FIDMetric(extractor, real, batch_size=256)
    for batch in fake.split(400):
        metric.update(batch)
    out = metric.compute()
    ref = fid_kid(real, fake, extractor, kid_subsets=2)
    assert out["fid"] == pytest.approx(ref["fid"], rel=1e-5)
    assert (out["n_real"], out["n_fake"]) == (len(real), len(fake))
    metric.reset_fake()
    metric.update(real)
    assert abs(metric.compute()["fid"]) < 1e-3 * ref["fid"]  # the real statistics were kept


def test_fid_metric_state_is_sum_reducible_like_a_ddp_sync(extractor, real, noise):
    """Two 'ranks' (each with its stride-shard of the real set and half of the fake batches),
    merged, equal one metric that saw everything; so does summing the states by hand."""
    fake = (real + 0.2 * noise).split(300)
    whole = FIDMetric(extractor, real, rank=0, world_size=1)
    ranks = [FIDMetric(extractor, real, rank=r, world_size=2) for r in range(2)]
    for i, batch in enumerate(fake):
        whole.update(batch)
        ranks[i % 2].update(batch)
    states = [r.metric.metric_state for r in ranks]
    summed = {k: states[0][k] + states[1][k] for k in states[0]}
    for key, value in whole.metric.metric_state.items():
        assert torch.allclose(summed[key].double(), value.double(), rtol=1e-6, atol=1e-6), key
    ranks[0].merge(ranks[1])
    merged, ref = ranks[0].compute(), whole.compute()
    assert merged["fid"] == pytest.approx(ref["fid"], rel=1e-6)
    assert (merged["n_real"], merged["n_fake"]) == (ref["n_real"], ref["n_fake"])


def test_fid_metric_is_not_a_module():
    """Held by a callback, never registered in a LightningModule (no extractor in checkpoints)."""
    assert not issubclass(FIDMetric, torch.nn.Module)


# --- InceptionV3 ------------------------------------------------------------------------------


def test_inception_features_from_a_weights_path(random_inception_weights, no_download):
    net = InceptionFeatures(random_inception_weights)
    assert net.num_features == 2048 and not net.training
    gen = torch.Generator().manual_seed(0)
    gray = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    rgb = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    f_gray, f_rgb = net(gray), net(rgb)
    assert f_gray.shape == f_rgb.shape == (2, 2048)
    assert torch.isfinite(f_gray).all() and torch.isfinite(f_rgb).all()
    # what torch-fidelity receives: uint8 0..255, grayscale repeated to three channels
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return (torch.zeros(len(x), 2048),)

    net.net = Recorder()
    net(torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2))
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 2, 2)
    assert seen[0][0, 2].flatten().tolist() == [0, 128, 255, 255]


def test_inception_without_weights_names_the_expected_location(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(None)
    assert str(expected) in str(err.value) and "torch-fidelity" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_feature_extractor("inception", tmp_path / "nowhere.pth")


def test_inception_weights_found_in_the_torch_hub_cache(
    tmp_path, monkeypatch, random_inception_weights, no_download
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME
    target.parent.mkdir(parents=True)
    target.symlink_to(random_inception_weights)
    net = build_feature_extractor("inception", None)
    assert isinstance(net, InceptionFeatures) and net.weights_path == str(target)


def test_build_feature_extractor(tmp_path, classifier):
    path = save_classifier(classifier[0], tmp_path / "c.pt", {"dataset": "digits"})
    ext = build_feature_extractor("classifier", str(path))
    assert ext.name == "digits8_classifier" and ext(torch.zeros(3, 1, 8, 8)).shape == (3, 128)
    with pytest.raises(ValueError, match="classifier, inception"):
        build_feature_extractor("vgg", None)
    with pytest.raises(ValueError, match="train_features"):
        build_feature_extractor("classifier", None)


# --- the train_features command ---------------------------------------------------------------


def test_train_features_config_composes(compose):
    cfg = compose(["image_size=16", "paths.root_dir=/somewhere"], name="train_features")
    assert cfg.task_name == "train_features"
    assert cfg.output == "/somewhere/artifacts/features/digits16_classifier.pt"


def test_train_features_tiny_run_writes_a_loadable_file(compose, tmp_path, capsys):
    out = tmp_path / "c16.pt"
    cfg = compose(
        ["image_size=16", "epochs=1", f"output={out}", f"paths.root_dir={tmp_path}"],
        name="train_features",
    )
    result = train_features(cfg)
    assert str(out) in capsys.readouterr().out
    model = load_classifier(out)
    assert model.image_size == 16 and model.meta["val_accuracy"] == result["val_accuracy"]
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
