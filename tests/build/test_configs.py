"""Every option of every config group composes and instantiates; representative runs work."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from diffexp.build.factory import (
    ConfigError,
    build_datamodule,
    build_denoiser,
    build_module,
    build_sampler,
)
from diffexp.training.loggers import CHOICE_GROUPS
from tests.helpers import conf_option, conf_options

GROUPS = [
    *CHOICE_GROUPS,
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "experiment",
    "hparams_search",
    "debug",
]


# networks that need a particular kind of data, and image data sets (which need an image network)
PAIRED_DATA = {"oracle": "ring8", "unet": "cifar10", "unet_small": "digits"}
IMAGE_DATA = {"digits", "digits16", "mnist", "cifar10"}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in conf_options(g)], ids=lambda v: str(v)
)
def test_every_option_of_every_group_composes(compose, group, option):
    overrides = [f"{group}={option}"]
    if group == "network" and option in PAIRED_DATA:
        overrides.append(f"data={PAIRED_DATA[option]}")
    if group == "data" and option in IMAGE_DATA:
        overrides.append("network=unet_small")
    cfg = compose(overrides)
    assert cfg is not None
    if group in ("schedule", "parameterization", "weighting", "noise_sampling", "sampler"):
        assert instantiate(cfg[group]) is not None
    if group == "data":
        dm = build_datamodule(cfg.data)
        assert dm.dim == math.prod(dm.shape)
    if group in ("network", "data", "experiment"):
        dm = build_datamodule(cfg.data)
        den = build_denoiser(cfg, dm)
        out = den(torch.zeros(4, *dm.shape), log_snr=torch.zeros(4))
        assert out.x0_hat.shape == (4, *dm.shape)
    if group == "logger":
        # each logger entry is instantiable (W&B is offline in tests)
        for lg in cfg.logger.values():
            assert "_target_" in lg


def test_every_group_of_the_design_exists():
    for group in GROUPS:
        assert conf_options(group), f"conf/{group} has no options"


def test_unknown_option_lists_the_valid_ones(compose):
    with pytest.raises(MissingConfigException) as err:
        compose(["schedule=cosinee"])
    message = str(err.value)
    for valid in ("cosine", "linear", "log_linear", "learned"):
        assert valid in message


def test_oracle_on_data_without_a_density_is_refused(compose):
    cfg = compose(["network=oracle", "data=moons"])
    with pytest.raises(ConfigError, match="known density"):
        build_denoiser(cfg, build_datamodule(cfg.data))


def test_network_that_cannot_take_the_data_shape_is_refused_at_build_time(compose):
    cfg = compose(["data=ring8", "network.dim=3"])
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        build_module(cfg, build_datamodule(cfg.data))


def test_sampler_steps_override(compose):
    cfg = compose(["sampler.steps=7"])
    assert build_sampler(cfg.sampler).steps == 7
    assert build_sampler(cfg.sampler, steps=3).steps == 3


# preset -> (parameterization, weighting, noise sampling, schedule) it composes
OBJECTIVE_PRESETS = {
    "edm": ("EDM", "edm", "lognormal", "LogLinear"),
    "rectified_flow": ("Flow", "unit", "schedule", "RectifiedFlow"),
    "rectified_flow_logit_normal": ("Flow", "unit", "logit_normal", "RectifiedFlow"),
    "sigmoid": ("V", "sigmoid", "schedule", "LogLinear"),
}


@pytest.mark.parametrize("preset", sorted(OBJECTIVE_PRESETS))
def test_objective_presets_compose_for_cifar10(compose, preset):
    cfg = compose([f"experiment={preset}", "data=cifar10", "network=unet"])
    module = build_module(cfg, build_datamodule(cfg.data))
    got = (
        type(module.denoiser.parameterization).__name__,
        module.objective.weighting.name,
        module.objective.noise_sampling.name,
        type(module.schedule).__name__,
    )
    assert got == OBJECTIVE_PRESETS[preset]
    if preset == "edm":  # images in [-1, 1]
        assert module.denoiser.parameterization.sigma_data == 0.5
        assert module.objective.weighting.sigma_data == 0.5


# objective preset -> (parameterization, weighting, noise sampling, schedule) it composes
OBJECTIVES = {
    "vdm": ("Eps", "elbo", "schedule", "LogLinear"),
    "vdm_adaptive": ("Eps", "elbo", "adaptive", "LogLinear"),
    "v_sigmoid": ("V", "sigmoid", "schedule", "LogLinear"),
    "v_sigmoid_adaptive": ("V", "sigmoid", "adaptive", "LogLinear"),
    "v_cosine": ("V", "unit", "schedule", "Cosine"),
    "edm": ("EDM", "edm", "lognormal", "LogLinear"),
    "edm_adaptive": ("EDM", "edm", "adaptive", "LogLinear"),
    "x0_edm": ("EDM", "elbo", "schedule", "LogLinear"),
    "flow": ("Flow", "unit", "schedule", "RectifiedFlow"),
    "flow_logit_normal": ("Flow", "unit", "logit_normal", "RectifiedFlow"),
    "flow_adaptive": ("Flow", "unit", "adaptive", "RectifiedFlow"),
}


def _objective(module) -> tuple[str, str, str, str]:
    return (
        type(module.denoiser.parameterization).__name__,
        module.objective.weighting.name,
        module.objective.noise_sampling.name,
        type(module.schedule).__name__,
    )


@pytest.mark.parametrize("objective", conf_options("objective"))
def test_objective_presets_set_the_objective_over_an_experiments(compose, objective):
    assert objective in OBJECTIVES, f"conf/objective/{objective}.yaml: add it to OBJECTIVES"
    for data in ([], ["experiment=digits"]):  # digits sets eps/unit: the objective wins
        cfg = compose([*data, f"objective={objective}"])
        assert _objective(build_module(cfg, build_datamodule(cfg.data))) == OBJECTIVES[objective]


def test_the_vdmpp_ablation_sweeps_every_objective_preset_over_three_seeds(compose):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose(["experiment=ablation_objectives_vdmpp"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parser = OverridesParser.create()
    swept = {
        k: parser.parse_override(f"{k}={v}").sweep_string_iterator() for k, v in params.items()
    }
    assert sorted(swept["objective"]) == sorted(conf_options("objective"))
    assert list(swept["seed"]) == ["0", "1", "2"]
    digits = compose(["experiment=ablation_objectives_vdmpp_digits"], return_hydra_config=True)
    objectives = str(digits.hydra.sweeper.params.objective).split(",")
    assert set(objectives) <= set(OBJECTIVES) and not any("adaptive" in o for o in objectives)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["noise_sampling=lognormal", "model.T=100"], "model.T=100 is a T-step model"),
        (["noise_sampling=logit_normal", "schedule=learned"], "use noise_sampling=schedule"),
        (["noise_sampling=logit_normal", "noise_sampling.m=200"], "puts no mass"),
    ],
)
def test_noise_sampling_that_cannot_work_is_refused_at_build_time(compose, overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message):
        build_module(cfg, build_datamodule(cfg.data))


def test_a_heavy_tailed_noise_sampling_is_warned_about_and_a_sound_one_is_not(compose):
    cfg = compose(["noise_sampling=logit_normal"])  # the ELBO's w = 1: 1.6 nats looser
    with pytest.warns(UserWarning, match="heavy-tailed"):
        build_module(cfg, build_datamodule(cfg.data))
    cfg = compose(["experiment=edm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_module(cfg, build_datamodule(cfg.data))


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("parameterization", "weighting", "noise_sampling") for o in conf_options(g)],
    ids=str,
)
def test_a_parts_name_in_messages_is_its_option_name(group, option):
    """Error messages say ``weighting=<name>``: the class's ``name`` is the conf file's."""
    assert conf_option(group, option).name == option
