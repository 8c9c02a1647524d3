"""Loading a trained model (or the oracle) for evaluation and sampling.

A model comes from a training run's folder (``run=``: its ``checkpoints/last.ckpt``), from a
checkpoint file (``ckpt=``: the run's config is stored inside it), or, with neither, from the
configured network, which must then need no training (``network=oracle``). Checkpoints are read
with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import ReconstructionNLL
from diffexp.factory import (
    ConfigError,
    build_datamodule,
    build_denoiser,
    build_guidance,
    build_module,
    reconstruction_nll_of,
)
from diffexp.guidance import ClassifierGuided, NoGuidance


@dataclass
class LoadedModel:
    """What evaluation and sampling need: the denoiser, its data, T, and where it came from."""

    denoiser: Denoiser
    datamodule: Any
    T: int
    source: str
    config: DictConfig

    @property
    def reconstruction_nll(self) -> ReconstructionNLL:
        """The data's decoder (discretized for images)."""
        return reconstruction_nll_of(self.datamodule)


def resolve_checkpoint(run: str | None, ckpt: str | None) -> Path | None:
    """The checkpoint file named by ``run=`` (its last.ckpt) or ``ckpt=``; None for neither."""
    if run and ckpt:
        raise ConfigError("give either run=<run folder> or ckpt=<checkpoint file>, not both")
    if run:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            raise FileNotFoundError(
                f"run folder {run_dir} has no checkpoints/last.ckpt (found: {found or 'none'}); "
                "pass ckpt=<file> to choose one, or train longer so one is written"
            )
        return path
    if ckpt:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist; training runs write "
                "outputs/train/<date>/checkpoints/last.ckpt"
            )
        return path
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights-only unpickling; a clear error for unreadable or foreign files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the reason
        raise ValueError(
            f"cannot load checkpoint {path} safely (weights-only unpickling): {err}. "
            "It is corrupted, partial, or holds objects other than tensors and plain data."
        ) from err
    if "state_dict" not in state or "diffexp_config" not in state:
        raise ValueError(f"{path} is not a diffexp checkpoint (no state_dict / diffexp_config)")
    return state


def load_model(cfg: DictConfig, device: str = "cpu") -> LoadedModel:
    """The denoiser to evaluate or sample, per the ``run`` / ``ckpt`` / ``network`` options."""
    path = resolve_checkpoint(cfg.get("run"), cfg.get("ckpt"))
    if path is None:
        datamodule = build_datamodule(cfg.data)
        denoiser = build_denoiser(cfg, datamodule)
        if any(p.requires_grad for p in denoiser.network.parameters()):
            raise ConfigError(
                f"network {cfg.network.get('_target_')} has no trained weights here: pass "
                "run=<training run folder> or ckpt=<checkpoint>, or use network=oracle"
            )
        return LoadedModel(
            denoiser.to(device), datamodule, int(cfg.model.get("T", 0)), "oracle", cfg
        )
    state = load_checkpoint(path)
    train_cfg = OmegaConf.create(state["diffexp_config"])
    datamodule = build_datamodule(train_cfg.data)
    module = build_module(train_cfg, datamodule)
    module.load_state_dict(state["state_dict"])
    denoiser = module.eval_denoiser if cfg.get("use_ema", True) else module.denoiser
    denoiser.eval()
    return LoadedModel(denoiser.to(device), datamodule, module.T, str(path), train_cfg)


def guided_denoiser(model: LoadedModel, cfg: DictConfig) -> nn.Module:
    """The model wrapped by the configured guidance (``guidance=...``; none: as it is)."""
    spec = build_guidance(cfg, model.datamodule) if cfg.get("guidance") else NoGuidance()
    if isinstance(spec, ClassifierGuided):
        return spec.wrap(model.denoiser, getattr(model.datamodule, "mixture", None))
    if spec.conditional_network and not getattr(model.denoiser.network, "num_classes", 0):
        raise ConfigError(
            "guidance=cfg needs a model trained with classifier-free guidance (a conditional "
            "network); this one is unconditional. Train with guidance=cfg, or use "
            "guidance=classifier."
        )
    return spec.wrap(model.denoiser)


def sampling_labels(cfg: DictConfig, model: LoadedModel, n: int, device: str) -> Tensor | None:
    """Labels to sample: ``label=k`` for all, ``labels=[...]`` cycled, else every class cycled;
    None for an unconditional, unguided model."""
    num_classes = getattr(model.datamodule, "num_classes", 0)
    conditional = bool(getattr(model.denoiser.network, "num_classes", 0))
    guided = cfg.get("guidance") and cfg.guidance.get("_target_", "").split(".")[-1] != "NoGuidance"
    label, labels = cfg.get("label"), cfg.get("labels")
    if label is not None and labels is not None:
        raise ConfigError("give label=<k> or labels=[...], not both")
    chosen = [int(label)] if label is not None else (list(labels) if labels else None)
    if chosen is None and not (conditional or guided):
        return None
    if not num_classes:
        raise ConfigError("labels were asked for, but the data set has none")
    if chosen is None:
        chosen = list(range(num_classes))
    bad = [k for k in chosen if not 0 <= int(k) < num_classes]
    if bad:
        raise ConfigError(f"labels {bad} are not classes of this data (0..{num_classes - 1})")
    return torch.tensor(chosen, dtype=torch.long, device=device)[torch.arange(n) % len(chosen)]


def describe_guidance(denoiser: nn.Module, base: nn.Module) -> str:
    """A one-line name of the guidance wrapped around ``base`` ("none" when unwrapped)."""
    if denoiser is base:
        return "none"
    return f"{type(denoiser).__name__}(scale={getattr(denoiser, 'scale', None)})"
