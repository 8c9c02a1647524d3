"""The ``guidance`` config group: what a run trains (label dropout) and how it samples.

Each option is a small spec with a ``_target_``: ``NoGuidance``, ``CFG`` (classifier-free) and
``ClassifierGuided``. ``wrap(denoiser, classifier)`` returns the Denoiser that samplers and
metrics use; a spec does no I/O: the loader (``build.runs``) loads the classifier of a spec
with ``needs_classifier`` and hands it in.
Convention (classifier-free): eps = w eps(x_t, y) + (1 - w) eps(x_t, null), so w = 0 is the
unconditional model, w = 1 the conditional one, w > 1 sharpens.

Importing this module costs nothing (torch is imported where a denoiser is wrapped), so the
entry points can check ``guidance.classifier`` before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffexp.cli import TRAIN_CLASSIFIER, ConfigError

if TYPE_CHECKING:
    from torch import nn

    from diffexp.diffusion.denoiser import Denoiser, DenoiserLike


def check_classifier_option(classifier: Any) -> None:
    """Refuse a ``guidance.classifier`` that is neither ``oracle`` nor an existing checkpoint (or
    a classifier run folder)."""
    if classifier is None or not str(classifier).strip():
        raise ConfigError(
            f"guidance.classifier={'null' if classifier is None else repr(classifier)}: "
            "guidance=classifier needs a noisy classifier: "
            "expected oracle (the exact classifier of a Gaussian-mixture data set such as ring8) "
            f"or the path of a classifier checkpoint made by `{TRAIN_CLASSIFIER}` (its "
            "checkpoints/last.ckpt, or its run folder). Set guidance.classifier=oracle, or "
            "guidance.classifier=<checkpoint>."
        )
    if str(classifier) == "oracle":
        return
    path = Path(str(classifier)).expanduser()
    if path.is_dir():
        if not (path / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(
                f"guidance.classifier={classifier}: the folder has no checkpoints/last.ckpt. "
                f"Pass a classifier run folder or checkpoint made by `{TRAIN_CLASSIFIER}`, or "
                "guidance.classifier=oracle for a Gaussian-mixture data set."
            )
        return
    if not path.is_file():
        raise ConfigError(
            f"guidance.classifier={classifier}: no such file. Expected oracle (Gaussian-mixture "
            "data) or a classifier checkpoint (or run folder) made by "
            f"`{TRAIN_CLASSIFIER}`; it writes <run folder>/checkpoints/last.ckpt."
        )


@dataclass
class NoGuidance:
    """An unconditional model, sampled as it is."""

    needs_labels = False
    needs_classifier = False
    conditional_network = False
    p_uncond = 0.0

    def wrap(self, denoiser: Denoiser, classifier: nn.Module | None = None) -> DenoiserLike:
        """The denoiser itself."""
        return denoiser


@dataclass
class CFG:
    """Classifier-free guidance: label dropout with ``p_uncond`` in training, ``scale`` w."""

    scale: float = 3.0
    p_uncond: float = 0.1
    interval: Any = None
    needs_labels = True
    needs_classifier = False
    conditional_network = True

    def __post_init__(self) -> None:
        if not 0.0 < self.p_uncond < 1.0:
            raise ValueError(f"guidance.p_uncond must be in (0, 1), got {self.p_uncond}")
        self.interval = check_interval(self.interval)

    def wrap(self, denoiser: Denoiser, classifier: nn.Module | None = None) -> DenoiserLike:
        """w eps(x_t, y) + (1 - w) eps(x_t, null), null = the network's num_classes; w = 1
        outside ``interval`` (a log-SNR range) when one is set."""
        from diffexp.diffusion.guidance import ClassifierFreeGuidance

        null = denoiser.network.num_classes
        return ClassifierFreeGuidance(denoiser, self.scale, null_label=null, interval=self.interval)


def check_interval(interval: Any) -> tuple[float, float] | None:
    """``guidance.interval``: null, or [lambda_lo, lambda_hi] with lambda_lo < lambda_hi."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or not lo < hi:
        raise ConfigError(
            f"guidance.interval={interval!r}: expected null (guidance at every noise level) or "
            "a log-SNR range [lambda_lo, lambda_hi] with lambda_lo < lambda_hi, inside which "
            "the guidance scale applies (the plain conditional model outside), e.g. "
            "guidance.interval=[-2,4]."
        )
    return lo, hi


@dataclass
class ClassifierGuided:
    """Classifier guidance: an unconditional model plus w grad log p_phi(y | x_t).

    ``classifier``: a checkpoint from ``python -m diffexp.train_classifier``, or ``oracle`` for the
    exact classifier of a Gaussian-mixture data set.
    """

    classifier: str | None = "oracle"
    scale: float = 1.0
    needs_labels = True
    needs_classifier = True
    conditional_network = False
    p_uncond = 0.0

    def wrap(self, denoiser: Denoiser, classifier: nn.Module | None = None) -> DenoiserLike:
        """score + w grad log p_phi(y | x_t), p_phi the loaded ``classifier``."""
        from diffexp.diffusion.guidance import ClassifierGuidance

        if classifier is None:
            raise ValueError("classifier guidance wraps a loaded classifier; none was given")
        return ClassifierGuidance(denoiser, classifier, self.scale)
