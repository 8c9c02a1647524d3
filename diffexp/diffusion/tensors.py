"""Small torch helpers shared by the core and the metrics (no Hydra, no Lightning)."""

from __future__ import annotations

import torch


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A context in which autocast is off on ``x``'s device: math there runs in x's dtype
    (under ``trainer.precision=bf16-mixed`` only the network runs in bf16)."""
    return torch.autocast(x.device.type, enabled=False)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
