"""Builds the parts of a run from a composed config: data module, denoiser, module, sampler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp.build.checks import check_schedule_options
from diffexp.build.guidance_specs import NoGuidance
from diffexp.cli import CONF_DIR, ConfigError
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import gaussian_reconstruction_nll
from diffexp.networks.oracle import Oracle
from diffexp.training.diffusion_module import DiffusionModule


def build_datamodule(cfg_data: DictConfig, require_files: bool = False) -> pl.LightningDataModule:
    """The data module of ``cfg.data``, instantiated as it is (the data description keys, such as
    ``log_snr_max``, are constructor arguments).

    ``require_files``: refuse now (a ``ConfigError`` naming ``data.data_dir`` and the expected
    files) when the data set's files are absent and ``data.download`` is false, rather than when
    the data is loaded; the data module is built without them otherwise (its shape is known).
    """
    datamodule = instantiate(cfg_data)
    if require_files:
        require_data_files(datamodule)
    return datamodule


def require_data_files(datamodule: Any) -> None:
    """Refuse a data module whose files are absent and will not be downloaded (data sets read
    from files only: MNIST, CIFAR-10)."""
    check = getattr(datamodule, "require_files", None)
    if callable(check):
        check()


def build_guidance(cfg: DictConfig, datamodule: Any) -> Any:
    """The guidance spec; a clear error when it needs labels the data does not have."""
    spec = instantiate(cfg.guidance) if cfg.get("guidance") else NoGuidance()
    if spec.needs_labels and not getattr(datamodule, "num_classes", 0):
        raise ConfigError(
            f"guidance={type(spec).__name__} needs a labelled data set; "
            f"{type(datamodule).__name__}({getattr(datamodule, 'name', '')}) has no labels. "
            f"Use a labelled one ({', '.join(labelled_data_options(cfg))}) or guidance=none."
        )
    return spec


def data_options(cfg: DictConfig, has: Callable[[Any], bool]) -> list[str]:
    """The ``data=`` options of conf/data whose data module ``has`` what is asked, found by
    building each in ``cfg`` (for error messages: it takes a second)."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(base, False)
    found = []
    for path in sorted(Path(CONF_DIR, "data").glob("*.yaml")):
        base.data = OmegaConf.load(path)
        try:
            datamodule = build_datamodule(base.data)
        except Exception:  # an option that cannot be built here is not offered
            continue
        if has(datamodule):
            found.append(path.stem)
    return found


def labelled_data_options(cfg: DictConfig) -> list[str]:
    """The ``data=`` options with labels (``num_classes`` > 0)."""
    return data_options(cfg, lambda dm: getattr(dm, "num_classes", 0) > 0)


def mixture_data_options(cfg: DictConfig) -> list[str]:
    """The ``data=`` options with an exact density (a Gaussian mixture: the oracle's data)."""
    return data_options(cfg, lambda dm: getattr(dm, "mixture", None) is not None)


def fixed_schedule(name: str, log_snr_max: float, log_snr_min: float) -> torch.nn.Module:
    """conf/schedule/<name>.yaml built with the endpoints given (a fixed schedule)."""
    check_schedule_options([name], "schedule")
    node = OmegaConf.load(Path(CONF_DIR, "schedule", f"{name}.yaml"))
    return instantiate(node, log_snr_max=log_snr_max, log_snr_min=log_snr_min)


def build_network(
    cfg_network: DictConfig, datamodule: Any, parameterization: Any, conditional: bool = False
) -> torch.nn.Module:
    """The network; ``dim``, ``in_channels``, ``image_size`` left null come from the data module,
    and ``num_classes`` too when the network is ``conditional`` (0 otherwise)."""
    if issubclass(get_class(cfg_network._target_), Oracle):
        return instantiate(
            cfg_network,
            mixture=datamodule.mixture,
            parameterization=parameterization,
            conditional=conditional,
        )
    shape = tuple(datamodule.shape)
    if "dim" in cfg_network and len(shape) != 1:  # a network for vectors, such as the MLP
        name = getattr(datamodule, "name", "") or type(datamodule).__name__
        raise ConfigError(
            f"network={_short(cfg_network)} takes vectors [batch, dim], but data={name} gives "
            f"images of shape {shape}. Use an image network: network=unet_small (small images "
            "such as digits) or network=unet."
        )
    from_data = {
        "dim": lambda: datamodule.dim,
        "in_channels": lambda: shape[0],
        "image_size": lambda: _square_size(shape),
        "num_classes": lambda: datamodule.num_classes if conditional else 0,
    }
    kwargs = {
        k: get() for k, get in from_data.items() if k in cfg_network and cfg_network[k] is None
    }
    return instantiate(cfg_network, **kwargs)


def _short(cfg_network: DictConfig) -> str:
    """The option name of a network config, as on the command line (network=mlp)."""
    return str(cfg_network.get("_target_", "?")).rsplit(".", 1)[-1].lower()


def _square_size(shape: tuple[int, ...]) -> int:
    """The side of square images [C, H, H]; a clear error for anything else."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"an image network needs square images [C, H, H]; the data has shape {shape}. "
            "Use network=mlp for vectors."
        )
    return int(shape[1])


def build_denoiser(cfg: DictConfig, datamodule: Any, guidance: Any = None) -> Denoiser:
    """network + parameterization + schedule, checked on a dummy batch of the data's shape;
    ``guidance``: the built guidance spec (built here when not given)."""
    no_density = getattr(datamodule, "mixture", None) is None
    if issubclass(get_class(cfg.network._target_), Oracle) and no_density:
        raise ConfigError(
            f"network=oracle needs a data set with a known density; "
            f"{type(datamodule).__name__}({getattr(datamodule, 'name', '')}) has none. Use "
            f"{' or '.join(f'data={d}' for d in mixture_data_options(cfg))}, or a trained "
            "network (network=mlp)."
        )
    schedule = instantiate(cfg.schedule)
    parameterization = instantiate(cfg.parameterization)
    guidance = guidance or build_guidance(cfg, datamodule)
    try:
        network = build_network(
            cfg.network, datamodule, parameterization, conditional=guidance.conditional_network
        )
        denoiser = Denoiser(network, parameterization, schedule)
        check_shapes(denoiser, tuple(datamodule.shape))
    except ConfigError as err:
        # absent data files come first: the network is fixed for data that is there
        try:
            require_data_files(datamodule)
        except ConfigError as missing:
            raise type(missing)(
                f"{missing} (Once the data is there, this is refused too: {err})"
            ) from err
        raise
    return denoiser


def check_shapes(denoiser: Denoiser, shape: tuple[int, ...]) -> None:
    """Fail now, not hours into a run, when the network cannot take the data's shape."""
    x = torch.zeros(2, *shape)
    with torch.no_grad():
        try:
            denoiser(x, log_snr=torch.zeros(2))
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"the network cannot take data of shape {shape}: {err}") from err


def build_module(cfg: DictConfig, datamodule: Any) -> DiffusionModule:
    """The LightningModule for ``cfg`` on ``datamodule``."""
    model = cfg.model
    lr_scheduler = model.get("lr_scheduler")
    guidance = build_guidance(cfg, datamodule)
    pieces = {
        "p_uncond": guidance.p_uncond,
        "denoiser": build_denoiser(cfg, datamodule, guidance),
        "weighting": instantiate(cfg.weighting),
        "noise_sampling": instantiate(cfg.noise_sampling) if cfg.get("noise_sampling") else None,
        "optimizer": instantiate(model.optimizer),
        "lr_scheduler": instantiate(lr_scheduler) if lr_scheduler else None,
        "reconstruction_nll": reconstruction_nll_of(datamodule),
    }
    try:
        module = DiffusionModule(
            **pieces,
            T=model.get("T", 0),
            ema_decay=model.get("ema_decay"),
            ema_warmup=model.get("ema_warmup"),
            schedule_lr=model.get("schedule_lr"),
            reconstruction=model.get("reconstruction", "denoiser"),
            grad_clip=model.get("grad_clip"),
            compile_network=bool(model.get("compile", False)),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    except ValueError as err:  # the module refuses a combination of options
        raise ConfigError(str(err)) from err
    clip = cfg.get("trainer", {}).get("gradient_clip_val")
    if clip and any(p.requires_grad for p in module.schedule.parameters()):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} clips one norm over all parameters, and a learned "
            "schedule's gradient (in nats^2 under its variance objective) would set the "
            "network's scale. Clip each group alone: trainer.gradient_clip_val=null "
            f"model.grad_clip={{network:{clip}}} (and schedule:<norm> to clip the schedule too)."
        )
    return module


def reconstruction_nll_of(datamodule: Any) -> Any:
    """The data's decoder: discretized for images with a fixed number of levels, else Gaussian."""
    return getattr(datamodule, "reconstruction_nll", gaussian_reconstruction_nll)


def build_sampler(
    cfg_sampler: DictConfig, steps: int | None = None, times: list[float] | None = None
) -> Any:
    """The sampler, with ``steps`` overriding the configured number of steps and ``times`` the
    optimized grid's (``build.grids.load_grid_times``)."""
    extra: dict[str, Any] = {"steps": steps} if steps else {}
    if times is not None:
        extra["times"] = times
    return instantiate(cfg_sampler, **extra)
