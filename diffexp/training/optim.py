"""Optimizer helpers shared by the LightningModules: the optimizer with its per-step LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def optimizers_with_schedule(
    optimizer: torch.optim.Optimizer, lr_scheduler_factory: Callable[..., Any] | None
) -> Any:
    """Lightning's configure_optimizers value: the optimizer, with a per-step LR schedule."""
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def cosine_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_frac: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: linear warm-up to 1, then cosine decay to ``final_frac`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= 0:  # no known length (epoch-based runs): constant after warm-up
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
