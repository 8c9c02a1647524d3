"""Test set-up: no test may touch the network, W&B stays offline, and the `compose` fixture
composes a config whose run writes under the test's tmp_path (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import compose_config

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    """Allow local sockets (W&B's service, gloo); refuse anything else at once."""
    if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in _LOCAL_HOSTS):
        return _real_connect(self, address)
    raise ConnectionRefusedError(f"tests must not use the network (tried to connect to {address})")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture
def compose(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose(overrides, name="train")``: a config whose run writes under the test's tmp_path."""

    def _compose(
        overrides: Sequence[str] = (), name: str = "train", return_hydra_config: bool = False
    ) -> DictConfig:
        return compose_config(
            name, [f"paths.output_dir={tmp_path}", *overrides], return_hydra_config
        )

    return _compose
