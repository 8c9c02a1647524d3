"""Feature extractors for FID / KID: a small domain classifier and torch-fidelity's InceptionV3.

Every extractor is an ``nn.Module`` mapping images in [-1, 1] (float ``[B, C, H, W]``) to
features ``[B, F]``, with a ``name`` and ``num_features``; it never leaves evaluation mode and
its weights are frozen. Nothing here ever downloads weights: a missing file raises a
``FileNotFoundError`` that says where to put it.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "ClassifierFeatures",
    "DigitsClassifier",
    "InceptionFeatures",
    "build_feature_extractor",
    "classifier_accuracy",
    "default_inception_path",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
)
FEATURE_KINDS = ("classifier", "inception")


def _to_unit_range(x: Tensor) -> Tensor:
    """Float images in [-1, 1] (uint8 0..255 input is rescaled; out-of-range values clipped)."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float().clamp(-1.0, 1.0)


class DigitsClassifier(nn.Module):
    """Small CNN classifier for ``[B, in_channels, S, S]`` images in [-1, 1], S a power of two."""

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 128,
    ):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(
                f"image_size must be a power of two >= 8 (8, 16, 32); got {image_size}"
            )
        self.image_size, self.num_classes, self.in_channels = image_size, num_classes, in_channels
        self.width, self.hidden = width, hidden
        self.name = f"classifier{image_size}"
        self.num_features = hidden
        self.meta: dict[str, Any] = {}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        size = image_size
        while size > 8:  # pool first, then convolve: cheap at 16 and 32
            layers += [nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            size //= 2
        layers += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    @property
    def config(self) -> dict[str, int]:
        """The constructor arguments, as a plain dict."""
        return {
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "width": self.width,
            "hidden": self.hidden,
        }

    def _check(self, x: Tensor) -> None:
        """Raise a ValueError unless ``x`` is ``[B, in_channels, S, S]``."""
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{self.name} expects images [B, {want[0]}, {want[1]}, {want[2]}]; "
                f"got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, hidden]`` of images in [-1, 1]."""
        self._check(x)
        return self.fc(self.conv(_to_unit_range(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))

    def as_feature_extractor(self) -> ClassifierFeatures:
        """An always-eval FID feature extractor sharing (and freezing) these weights."""
        return ClassifierFeatures(self)


class ClassifierFeatures(nn.Module):
    """FID feature extractor: a trained classifier's penultimate features, frozen, always eval."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.name = classifier.name
        self.num_features = classifier.num_features
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Stay in evaluation mode whatever is asked (the features must not change)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, num_features]`` of images in [-1, 1] (or uint8)."""
        return self.classifier.features(x)


@contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (unchanged when ``n`` is None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    epochs: int = 30,
    lr: float = 2e-3,
    seed: int = 0,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    width: int = 32,
    hidden: int = 128,
    num_classes: int | None = None,
    num_threads: int | None = 1,
) -> tuple[DigitsClassifier, float]:
    """Train a ``DigitsClassifier`` with AdamW on CPU; returns it (eval mode) and val accuracy.

    Deterministic given ``seed`` (the global RNG is left untouched). ``num_threads`` torch
    threads during training: the model is tiny, so 1 is fastest, and several threads on busy
    shared cores are many times slower.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be [N, C, S, S]; got {tuple(images.shape)}")
    labels, val_labels = labels.long(), val_labels.long()
    n_cls = int(num_classes or max(int(labels.max()), int(val_labels.max())) + 1)
    with torch.random.fork_rng(devices=[]), _num_threads(num_threads):
        torch.manual_seed(seed)
        model = DigitsClassifier(
            image_size=images.shape[-1],
            num_classes=n_cls,
            in_channels=images.shape[1],
            width=width,
            hidden=hidden,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = max(1, epochs * math.ceil(len(images) / batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                loss = F.cross_entropy(model(images[idx].float()), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        return model, classifier_accuracy(model, val_images, val_labels)


@torch.no_grad()
def classifier_accuracy(
    model: DigitsClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000
) -> float:
    """Fraction of ``images`` whose argmax logit equals the label."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x.float()).argmax(-1) == y.long()).sum())
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    model.train(was_training)
    return correct / max(len(images), 1)


def _plain(value: Any) -> Any:
    """``value`` as plain Python data (what ``torch.load(weights_only=True)`` can read)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return str(value)


def save_classifier(model: DigitsClassifier, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write state_dict + constructor arguments + metadata to ``path`` atomically; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = _plain(dict(meta))
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("image_size", model.image_size)
    payload = {
        "format": "diffexp.classifier/1",
        "config": model.config,
        "meta": meta,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # the usual permissions (umask), unlike mkstemp's 0600
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _creating_command(path: Path) -> str:
    """The command that writes the classifier file ``path`` (guessed from its name)."""
    m = re.fullmatch(r"digits(\d+)_classifier\.pt", path.name)
    size = m.group(1) if m else "<8|16|32>"
    return f"python -m diffexp.train_features image_size={size} output={path}"


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitsClassifier:
    """The classifier saved by ``save_classifier`` at ``path``, in eval mode (``.meta`` set)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature classifier at {path}; create it with `{_creating_command(path)}`"
        )
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not a classifier file written by save_classifier")
    model = DigitsClassifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.meta = dict(payload.get("meta", {}))
    dataset = model.meta.get("dataset")
    if dataset:
        model.name = f"{dataset}{model.image_size}_classifier"
    return model.eval()


def default_inception_path() -> Path:
    """Where torch hub would cache the FID InceptionV3 weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _missing_inception(path: Path, explicit: bool) -> FileNotFoundError:
    """The error for absent InceptionV3 weights: where to put them and where they come from."""
    where = (
        f"the file given ({path}) does not exist"
        if explicit
        else f"expected it at {path} (the torch hub cache: $TORCH_HOME/hub/checkpoints, "
        "TORCH_HOME defaulting to ~/.cache/torch)"
    )
    return FileNotFoundError(
        f"FID InceptionV3 weights not found: {where}. diffexp never downloads weights. "
        f"Get '{INCEPTION_FILENAME}' (torch-fidelity's v0.2.0 release asset, {INCEPTION_URL}) on "
        f"a machine with internet access, copy it to {default_inception_path()} or pass its "
        "path explicitly (InceptionFeatures(weights_path=...) / the extractor's path setting)."
    )


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3: images in [-1, 1] -> 2048-d pool features, frozen."""

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        explicit = weights_path is not None
        path = Path(weights_path).expanduser() if explicit else default_inception_path()
        if not path.is_file():
            raise _missing_inception(path, explicit)
        self.weights_path = str(path)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self.name = "inception_v3_2048"
        self.num_features = 2048
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in evaluation mode whatever is asked (the features must not change)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Pool features ``[B, 2048]``; grayscale is repeated to RGB, torch-fidelity resizes."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expects images [B, 1 or 3, H, W]; got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x.contiguous())[0].reshape(x.shape[0], -1)


def build_feature_extractor(kind: str, path: str | Path | None = None) -> nn.Module:
    """The FID feature extractor of ``kind`` ("classifier": a saved classifier file at ``path``;
    "inception": InceptionV3 weights at ``path`` or in the torch hub cache)."""
    if kind == "classifier":
        if path is None:
            raise ValueError(
                "the classifier feature extractor needs the path of a classifier file, e.g. "
                "${paths.root_dir}/artifacts/features/digits8_classifier.pt "
                "(written by `python -m diffexp.train_features image_size=8`)"
            )
        return load_classifier(path).as_feature_extractor()
    if kind == "inception":
        return InceptionFeatures(path)
    raise ValueError(f"unknown feature extractor kind {kind!r}; valid: {', '.join(FEATURE_KINDS)}")
