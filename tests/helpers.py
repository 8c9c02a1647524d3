"""Shared test helpers: configs composed as the command line does, the Gaussian-mixture oracle as a
Denoiser (float64), callbacks that crash or signal at a step."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.samplers import ProbabilityFlowODE
from diffexp.networks import Oracle

F64 = torch.float64
ENDS = {"log_snr_max": 10.0, "log_snr_min": -8.0}


ROOT = Path(__file__).resolve().parents[1]  # the repository
CONF = ROOT / "conf"


def compose_config(
    name: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False
) -> DictConfig:
    """conf/<name>.yaml composed in-process with ``overrides``, as the command line would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def conf_options(group: str) -> list[str]:
    """The options of conf/<group>: the registry tests parametrize over, so a new YAML file is a
    new test case the day it is added."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@functools.cache
def _option_node(group: str, name: str) -> dict[str, Any]:
    cfg = compose_config("train", [f"{group}={name}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def conf_option(group: str, name: str, **kwargs: Any) -> Any:
    """conf/<group>/<name>.yaml instantiated as ``python -m diffexp.train`` composes it (default
    data: ring8), ``kwargs`` overriding its arguments."""
    from hydra.utils import instantiate

    return instantiate(_option_node(group, name), **kwargs)


def oracle_denoiser(preset: str = "ring8", param: str = "eps", schedule=None) -> Denoiser:
    """The exact denoiser of a mixture preset (float64 schedule)."""
    mixture = make_mixture(preset).to(dtype=F64)
    p = conf_option("parameterization", param)
    schedule = schedule if schedule is not None else S.LogLinear(**ENDS)
    return Denoiser(Oracle(mixture, p), p, schedule).double()


# a training run of 4 steps on small ring data sets: a checkpoint for the entry points that read one
TINY_RING_RUN = (
    "trainer.max_steps=4",
    "data.n_train=2048",
    "data.n_val=256",
    "data.n_test=256",
    "callbacks.elbo.n_t=2",
    "callbacks.samples.every_n_epochs=0",
    "callbacks.samples.n=16",
    "logger=csv",
)


def pf_ode_reference(
    den: Denoiser, n: int, tol: float = 1e-8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x at t = 0 of the PF-ODE solved by dopri5 at rtol = atol = tol over log-SNR, from the
    noise of seed 0 (no final denoise): the reference of the solvers' order tests."""
    ode = ProbabilityFlowODE(
        solver="dopri5", rtol=tol, atol=tol, time_grid="log_snr", final_denoise=False
    )
    gen = torch.Generator().manual_seed(0)
    return ode.sample(den, (n, 2), generator=gen, dtype=dtype).x


class CrashAtStep:
    """A callback that raises when training reaches ``step`` (a crash after a checkpoint)."""

    def __new__(cls, step: int):
        import pytorch_lightning as pl

        class _Crash(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    raise RuntimeError(f"simulated crash at step {step}")

        return _Crash()


class SignalAtStep:
    """A callback that sends the process ``signal`` (a name: SIGTERM, SIGINT, SIGKILL, SIGUSR1)
    when training reaches ``step``: a signal arriving in the middle of a step, at a known step."""

    def __new__(cls, step: int, signal: str):
        import os
        import signal as signals

        import pytorch_lightning as pl

        signum = getattr(signals, signal)

        class _Signal(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signum)

        return _Signal()
