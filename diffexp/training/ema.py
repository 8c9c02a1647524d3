"""The EMA of a model's weights, what is evaluated and sampled: after each optimizer step,
theta_ema <- decay theta_ema + (1 - decay) theta (the first update copies theta).

One fused ``torch._foreach_lerp_`` over tensor lists gathered once, and no host-device sync: the
update count is kept on the host too (the ``n_averaged`` buffer is what checkpoints hold, under
the names ``torch.optim.swa_utils.AveragedModel`` gives it, so checkpoints of either load).
"""

from __future__ import annotations

import copy
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


class EMA(nn.Module):
    """theta_ema <- decay theta_ema + (1 - decay) theta, parameters and floating buffers alike
    (other buffers are copied); ``module`` is the averaged copy of the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self._count = 0  # n_averaged on the host
        self._refs: tuple[Any, ...] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward."""
        return self.module(*args, **kwargs)

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
        if self._count == 0:
            torch._foreach_copy_(ema, current)
        elif floating:
            torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        else:  # other buffers (counts, indices) are the model's
            pairs = list(zip(ema, current, strict=True))
            for e, c in pairs:
                if not e.is_floating_point():
                    e.copy_(c)
            pairs = [(e, c) for e, c in pairs if e.is_floating_point()]
            torch._foreach_lerp_([e for e, _ in pairs], [c for _, c in pairs], 1.0 - self.decay)
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
