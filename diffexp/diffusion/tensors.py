"""Small torch helpers shared by the core and the metrics (no Hydra, no Lightning)."""

from __future__ import annotations

import torch


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
