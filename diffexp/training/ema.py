"""The EMA of a model's weights, what is evaluated and sampled: after each optimizer step,
theta_ema <- decay theta_ema + (1 - decay) theta (the first update copies theta).

With a warm-up (``EMAWarmup``, as k-diffusion's ``EMAWarmup`` and diffusers' ``EMAModel(
use_ema_warmup=True)``) the decay of update n (n = 0, 1, ...: the updates before it) is
min(decay, max(min_decay, 1 - (1 + n / inv_gamma)^(-power))): the average forgets the early
weights quickly, then settles at ``decay``. It depends on the update count alone, which
checkpoints hold, so a resumed run continues exactly.

One fused ``torch._foreach_lerp_`` over tensor lists gathered once, and no host-device sync: the
update count is kept on the host too (the ``n_averaged`` buffer is what checkpoints hold, under
the names ``torch.optim.swa_utils.AveragedModel`` gives it, so checkpoints of either load).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn


def _tensor_refs(model: nn.Module) -> tuple[list[nn.Parameter], list[tuple[nn.Module, str]]]:
    """The parameters (their identity survives ``.to``) and (module, name) of the buffers (which
    ``.to`` replaces), in ``parameters()`` / ``buffers()`` order."""
    params = list(model.parameters())
    buffers = [
        (module, name)
        for module in model.modules()
        for name, b in module._buffers.items()  # noqa: SLF001 - the buffer's owner, not a copy
        if b is not None
    ]
    return params, buffers


@dataclass(frozen=True)
class EMAWarmup:
    """decay(n) = min(max_decay, max(min_decay, 1 - (1 + n / inv_gamma)^(-power))) at update n.

    k-diffusion's advice: inv_gamma=1, power=2/3 for long runs (decay 0.999 at 31.6K steps,
    0.9999 at 1M), power=3/4 for shorter ones (0.999 at 10K steps)."""

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("inv_gamma", "power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} is out of range: expected a number > 0")
        m = self.min_decay
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ValueError(f"min_decay={m!r} is out of range: expected a number in [0, 1)")
        for f in fields(self):
            if not math.isfinite(float(getattr(self, f.name))):
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not a finite number")

    @classmethod
    def of(
        cls, value: EMAWarmup | Mapping[str, float] | None, key: str = "ema_warmup"
    ) -> EMAWarmup | None:
        """``value`` as an ``EMAWarmup`` (a mapping of its fields, missing ones at their
        defaults), or None; a bad value raises ``ValueError`` naming ``key``."""
        if value is None or isinstance(value, cls):
            return value
        names = [f.name for f in fields(cls)]
        fix = (
            f"Use {key}=null (no warm-up) or e.g. "
            f"{key}={{inv_gamma:1.0,power:0.6667,min_decay:0.0}}."
        )
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}={value!r} is not a mapping of {', '.join(names)}. {fix}")
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(
                f"{key}.{unknown[0]} is not a setting of the EMA warm-up (expected "
                f"{', '.join(names)}). {fix}"
            )
        try:
            return cls(**{k: value[k] for k in value})
        except ValueError as err:
            raise ValueError(f"{key}.{err}. {fix}") from None

    def decay(self, n: int, max_decay: float) -> float:
        """min(max_decay, max(min_decay, 1 - (1 + n / inv_gamma)^(-power)))."""
        value = 1.0 - (1.0 + n / self.inv_gamma) ** (-self.power)
        return min(max_decay, max(self.min_decay, value))


class EMA(nn.Module):
    """theta_ema <- decay theta_ema + (1 - decay) theta, parameters and floating buffers alike
    (other buffers are copied); ``module`` is the averaged copy of the model. With ``warmup``,
    update n uses ``warmup.decay(n, decay)`` (``decay`` is the maximum)."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        warmup: EMAWarmup | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup: EMAWarmup | None = EMAWarmup.of(warmup)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self._count = 0  # n_averaged on the host
        self._refs: tuple[Any, ...] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward."""
        return self.module(*args, **kwargs)

    def current_decay(self) -> float:
        """The decay of the next update: ``decay``, or the warm-up's at n = ``n_averaged``."""
        if self.warmup is None:
            return self.decay
        return self.warmup.decay(self._count, self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the first one copies it)."""
        if self._refs is None or self._refs[0] is not model:
            ema_refs, refs = _tensor_refs(self.module), _tensor_refs(model)
            ema_all = ema_refs[0] + [m._buffers[n] for m, n in ema_refs[1]]  # noqa: SLF001
            floating = all(t.is_floating_point() for t in ema_all)  # .to keeps it so
            self._refs = (model, ema_refs, refs, floating)
        _, (ema_params, ema_bufs), (params, bufs), floating = self._refs
        ema = ema_params + [m._buffers[n] for m, n in ema_bufs]  # noqa: SLF001
        current = params + [m._buffers[n] for m, n in bufs]  # noqa: SLF001
        weight = 1.0 - self.current_decay()  # a host float: no sync
        if self._count == 0:
            torch._foreach_copy_(ema, current)
        elif floating:
            torch._foreach_lerp_(ema, current, weight)
        else:  # other buffers (counts, indices) are the model's
            pairs = list(zip(ema, current, strict=True))
            for e, c in pairs:
                if not e.is_floating_point():
                    e.copy_(c)
            pairs = [(e, c) for e, c in pairs if e.is_floating_point()]
            torch._foreach_lerp_([e for e, _ in pairs], [c for _, c in pairs], weight)
        self._count += 1
        self.n_averaged.add_(1)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        """Restore the host's update count with the buffer."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "n_averaged" in state_dict:
            self._count = int(state_dict[prefix + "n_averaged"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``trainer=ddp_spawn``) without the gathered tensor lists."""
        return {**self.__dict__, "_refs": None}
