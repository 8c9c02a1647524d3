"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C): track power-function EMAs of the weights during
training, save snapshots of them, and after training reconstruct the EMA of any other length.

The power-function EMA with exponent gamma updates at step t = 1, 2, ...

    theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t),  beta(t) = (1 - 1/t)^(gamma+1)

so theta_hat(t) = sum_{tau <= t} w_tau theta(tau) with w_tau = (1 - beta(tau)) (tau / t)^(gamma+1)
(the product of the later betas telescopes). In continuous time this is the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)  on [0, t]  (unit mass),

whose standard deviation relative to t is sigma_rel = (gamma+1)^(1/2) (gamma+2)^(-1)
(gamma+3)^(-1/2): EDM2 names an EMA by its sigma_rel (0.05 and 0.10 are tracked by default).

Reconstruction (EDM2 appendix C.3): snapshots theta_hat_i of profiles p_i = p_{t_i,gamma_i} were
saved. Since every snapshot is linear in the trajectory theta(tau), sum_i x_i theta_hat_i is the
average of theta(tau) under the profile sum_i x_i p_i; x is chosen to bring that profile closest
to the target p_* = p_{t_*,gamma_*} in L2 over training time:

    min_x || sum_i x_i p_i - p_* ||^2   <=>   A x = b,  A_ij = <p_i, p_j>,  b_i = <p_i, p_*>,

with the inner products in closed form: for t_a <= t_b,

    <p_a, p_b> = int_0^{t_a} p_a p_b dtau
               = (gamma_a+1)(gamma_b+1) / (gamma_a+gamma_b+1) (t_a / t_b)^gamma_b / t_b

(symmetric in a, b; ``profile_inner``). The residual ||sum_i x_i p_i - p_*|| / ||p_*|| (closed
form too: x^T A x - 2 x^T b + <p_*, p_*>) says how well the snapshots can represent the target.

Plain NumPy / PyTorch: the Lightning callback that writes the snapshots is
``training.callbacks.posthoc_ema.PostHocEMASnapshots``; ``python -m diffexp.eval run=<run>
ema.sigma_rel=0.05`` evaluates a reconstruction (``build.runs``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# EDM2's two tracked EMAs (their sigma_rel)
DEFAULT_SIGMA_RELS = (0.05, 0.10)
# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma^2 + 3 gamma + 1 = 0 and
# falls to 0 as gamma -> infinity; the branch gamma >= GAMMA_AT_MAX is the one EMAs use
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
SNAPSHOT_PATTERN = re.compile(r"^snapshot_(\d+)\.pt$")


# ---------------------------------------------------------------------- the profiles
def power_beta(gamma: float, t: int) -> float:
    """beta(t) = (1 - 1/t)^(gamma + 1): the decay of a power-function EMA at update t >= 1."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_ema_weights(gamma: float, t: int) -> np.ndarray:
    """w_tau = (1 - beta(tau)) (tau / t)^(gamma+1), tau = 1..t: theta_hat(t) = sum_tau w_tau
    theta(tau) exactly (the weights sum to 1)."""
    tau = np.arange(1, t + 1, dtype=np.float64)
    first = 1.0 - (1.0 - 1.0 / tau) ** (gamma + 1.0)
    return first * np.exp((gamma + 1.0) * (np.log(tau) - math.log(t)))


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = (gamma+1)^(1/2) (gamma+2)^(-1) (gamma+3)^(-1/2)."""
    if not gamma > -1.0:
        raise ValueError(f"the power EMA's exponent gamma must be > -1, got {gamma}")
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX)  # 0.3003 (gamma = -0.382)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0,
    s = sigma_rel (sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma + 1, expanded)."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel={sigma_rel} is not the relative width of a power-function EMA: expected "
            f"0 < sigma_rel <= {SIGMA_REL_MAX:.4f} (EDM2 tracks 0.05 and 0.10)"
        )
    inv = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    gamma = float(roots[np.abs(roots.imag) < 1e-6 * (1.0 + np.abs(roots.real))].real.max())
    # one Newton step on f(g) = s^2 (g+2)^2 (g+3) - (g+1) polishes np.roots' eigenvalue solve
    f = s * s * (gamma + 2.0) ** 2 * (gamma + 3.0) - (gamma + 1.0)
    df = s * s * (gamma + 2.0) * (3.0 * gamma + 8.0) - 1.0
    if df != 0.0:
        gamma -= f / df
    return max(gamma, GAMMA_AT_MAX)


def profile_inner(
    t_a: np.ndarray | float,
    gamma_a: np.ndarray | float,
    t_b: np.ndarray | float,
    gamma_b: np.ndarray | float,
) -> np.ndarray:
    """<p_a, p_b> = (g_a+1)(g_b+1) / (g_a+g_b+1) (t_min / t_max)^(g of t_max) / t_max, the L2
    inner product of the unit-mass profiles p_{t,g}(tau) = (g+1) tau^g / t^(g+1) on [0, t]
    (broadcast)."""
    t_a, t_b = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    g_a, g_b = np.asarray(gamma_a, np.float64), np.asarray(gamma_b, np.float64)
    t_max = np.maximum(t_a, t_b)
    exponent = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the longer profile
    ratio = np.minimum(t_a, t_b) / t_max
    return (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0) * ratio**exponent / t_max


def posthoc_coefficients(
    t_in: Sequence[float] | np.ndarray,
    gamma_in: Sequence[float] | np.ndarray,
    t_out: float,
    gamma_out: float,
) -> tuple[np.ndarray, float]:
    """x = argmin_x ||sum_i x_i p_{t_i,g_i} - p_{t_out,g_out}||_2 (A x = b, least squares), and
    the relative residual ||sum_i x_i p_i - p_out|| / ||p_out||."""
    t_in = np.asarray(t_in, np.float64).reshape(-1)
    g_in = np.asarray(gamma_in, np.float64).reshape(-1)
    A = profile_inner(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = profile_inner(t_in, g_in, t_out, gamma_out)
    # the Gram matrix of neighbouring snapshots is nearly singular: scale it to unit diagonal
    # and take the least-squares solution, which drops directions below machine precision
    scale = 1.0 / np.sqrt(np.diag(A))
    y = np.linalg.lstsq(A * scale[:, None] * scale[None, :], b * scale, rcond=None)[0]
    x = y * scale
    target = float(profile_inner(t_out, gamma_out, t_out, gamma_out))
    squared = float(x @ A @ x - 2.0 * x @ b + target)
    return x, math.sqrt(max(squared, 0.0) / target)


# ---------------------------------------------------------------------- the tracker
def _tensor_refs(model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """(state-dict name, owner, attribute, is a parameter) of ``model``'s parameters and
    persistent buffers, tied tensors once: the owner's dicts give the current tensor (``.to``
    replaces buffers)."""
    refs, seen = [], set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for attr, p in module._parameters.items():  # noqa: SLF001 - the owner, not a copy
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                refs.append((dot + attr, module, attr, True))
        skip = module._non_persistent_buffers_set  # noqa: SLF001
        for attr, b in module._buffers.items():  # noqa: SLF001
            if b is not None and attr not in skip and id(b) not in seen:
                seen.add(id(b))
                refs.append((dot + attr, module, attr, False))
    return refs


def _resolve(refs: list[tuple[str, nn.Module, str, bool]]) -> list[Tensor]:
    """The current tensors of ``_tensor_refs``."""
    return [
        (m._parameters[a] if is_param else m._buffers[a]).detach()  # noqa: SLF001
        for _, m, a, is_param in refs
    ]


class PowerEMA:
    """Power-function EMAs of one model for several gammas: at update t, theta_hat_j <-
    beta_j(t) theta_hat_j + (1 - beta_j(t)) theta with beta_j(t) = (1 - 1/t)^(gamma_j + 1)
    (floating tensors; others are copied). ``averages[j]``: name -> tensor, state-dict names."""

    def __init__(
        self,
        sigma_rels: Sequence[float] | None = DEFAULT_SIGMA_RELS,
        gammas: Sequence[float] | None = None,
    ) -> None:
        if gammas is None:
            if not sigma_rels:
                raise ValueError("PowerEMA needs sigma_rels or gammas (EDM2: 0.05 and 0.10)")
            gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.gammas = [float(g) for g in gammas]
        if not self.gammas or any(not g > -1.0 for g in self.gammas):
            raise ValueError(f"PowerEMA's gammas must be > -1, got {self.gammas}")
        self.sigma_rels = [gamma_to_sigma_rel(g) for g in self.gammas]
        self.t = 0
        self.averages: list[dict[str, Tensor]] = []
        self._refs: tuple[Any, ...] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update (t <- t + 1) of every EMA towards ``model``'s current tensors."""
        if self._refs is None or self._refs[0] is not model:
            self._refs = (model, _tensor_refs(model), None, None, None)
        _, refs, seen, floating, others = self._refs
        current = _resolve(refs)
        if seen is None or any(a is not b for a, b in zip(seen, current, strict=True)):
            floating, others = self._gather([r[0] for r in refs], current)
            self._refs = (model, refs, current, floating, others)
        self.t += 1
        for j, gamma in enumerate(self.gammas):
            ema_f, cur_f = floating[j]
            weight = 1.0 - power_beta(gamma, self.t)  # 1 at t = 1: a copy
            if ema_f:
                if weight == 1.0:
                    torch._foreach_copy_(ema_f, cur_f)
                else:
                    torch._foreach_lerp_(ema_f, cur_f, weight)
            for e, c in others[j]:
                e.copy_(c)

    def _gather(self, names: list[str], current: list[Tensor]) -> tuple[list, list]:
        """The (averages, current) tensor lists per gamma, floating and not; the averages follow
        the model's device and dtype (a tracker restored from a checkpoint is on the CPU until
        its first update)."""
        if not self.averages:
            self.averages = [
                {n: c.clone() for n, c in zip(names, current, strict=True)} for _ in self.gammas
            ]
        floating, others = [], []
        for avg in self.averages:
            missing = [n for n in names if n not in avg]
            if missing:
                raise ValueError(
                    f"the tracked EMAs have no {missing[0]} ({len(missing)} tensors missing): "
                    "they were restored from another network's state"
                )
            for n, c in zip(names, current, strict=True):
                if avg[n].device != c.device or avg[n].dtype != c.dtype:
                    avg[n] = avg[n].to(device=c.device, dtype=c.dtype)
            pairs = [(avg[n], c) for n, c in zip(names, current, strict=True)]
            fl = [(e, c) for e, c in pairs if c.is_floating_point()]
            floating.append(([e for e, _ in fl], [c for _, c in fl]))
            others.append([(e, c) for e, c in pairs if not c.is_floating_point()])
        return floating, others

    def state_dict(self) -> dict[str, Any]:
        """t, the gammas and the averages (tensors, as they are: the caller moves them)."""
        return {
            "t": self.t,
            "gammas": list(self.gammas),
            "sigma_rels": list(self.sigma_rels),
            "averages": [dict(a) for a in self.averages],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the gammas must be this tracker's."""
        gammas = [float(g) for g in state["gammas"]]
        if not np.allclose(gammas, self.gammas, rtol=1e-9, atol=0.0):
            raise ValueError(
                f"the saved power EMAs have gammas {gammas}, this tracker {self.gammas}: resume "
                "with the sigma_rels the run was started with"
            )
        self.t = int(state["t"])
        self.averages = [{n: v.detach().clone() for n, v in a.items()} for a in state["averages"]]
        self._refs = None

    def snapshot(self, step: int) -> dict[str, Any]:
        """What a snapshot file holds: the averages on the CPU, t, the gammas and the step."""
        return {
            "step": int(step),
            "t": self.t,
            "gammas": list(self.gammas),
            "sigma_rels": list(self.sigma_rels),
            "averages": [
                {n: v.detach().cpu().clone() for n, v in a.items()} for a in self.averages
            ],
        }


# ---------------------------------------------------------------------- snapshots on disk
@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file: its path, training step, tracker count t and gammas."""

    path: Path
    step: int
    t: int
    gammas: tuple[float, ...]


def snapshot_path(dirpath: str | os.PathLike, step: int) -> Path:
    """``<dirpath>/snapshot_<step>.pt`` (step zero-padded to 8 digits, so names sort by step)."""
    return Path(dirpath) / f"snapshot_{int(step):08d}.pt"


def snapshot_files(dirpath: str | os.PathLike) -> list[Path]:
    """The snapshot files in ``dirpath``, by step."""
    folder = Path(dirpath)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def _load(path: Path) -> dict[str, Any]:
    """A snapshot file, memory-mapped (tensors are read when used)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_snapshots(dirpath: str | os.PathLike) -> list[SnapshotInfo]:
    """Step, t and gammas of every snapshot in ``dirpath`` (memory-mapped: no tensor is read)."""
    infos = []
    for path in snapshot_files(dirpath):
        state = _load(path)
        infos.append(
            SnapshotInfo(path, int(state["step"]), int(state["t"]), tuple(state["gammas"]))
        )
    return infos


def plan_reconstruction(
    snapshots: Sequence[SnapshotInfo], sigma_rel: float, t_target: int | None = None
) -> tuple[np.ndarray, float, int]:
    """The coefficients x (one per snapshot and gamma, snapshot-major), the relative profile
    residual and the target t (default: the latest snapshot's) of the EMA with ``sigma_rel``."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    t_out = int(t_target) if t_target is not None else max(s.t for s in snapshots)
    t_in = [s.t for s in snapshots for _ in s.gammas]
    g_in = [g for s in snapshots for g in s.gammas]
    x, residual = posthoc_coefficients(t_in, g_in, t_out, sigma_rel_to_gamma(sigma_rel))
    return x, residual, t_out


@torch.no_grad()
def reconstruct(
    snapshots: Sequence[SnapshotInfo], coefficients: Iterable[float]
) -> dict[str, Tensor]:
    """sum_ij x_ij theta_hat_ij (accumulated in float64, returned in the snapshots' dtypes);
    tensors that are not floating come from the latest snapshot."""
    coefficients = list(coefficients)
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    latest: dict[str, Tensor] = {}
    latest_t = -1
    k = 0
    for info in snapshots:  # the order of ``plan_reconstruction``'s coefficients
        state = _load(info.path)
        for avg in state["averages"]:
            x = coefficients[k] if k < len(coefficients) else 0.0
            k += 1
            for name, v in avg.items():
                if not v.is_floating_point():
                    if info.t > latest_t:
                        latest[name] = v.clone()
                    continue
                dtypes[name] = v.dtype
                if name not in total:
                    total[name] = torch.zeros(v.shape, dtype=torch.float64)
                total[name].add_(v.double(), alpha=float(x))
        latest_t = max(latest_t, info.t)
    if k != len(coefficients):
        raise ValueError(f"{len(coefficients)} coefficients for {k} stored EMAs")
    return {**{n: v.to(dtypes[n]) for n, v in total.items()}, **latest}
