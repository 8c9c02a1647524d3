"""The ``guidance`` config group: what a run trains (label dropout) and how it samples.

Each option is a small spec with a ``_target_``: ``NoGuidance``, ``CFG`` (classifier-free) and
``ClassifierGuided``. ``wrap(denoiser)`` returns the Denoiser that samplers and metrics use.
Convention (classifier-free): eps = w eps(x_t, y) + (1 - w) eps(x_t, null), so w = 0 is the
unconditional model, w = 1 the conditional one, w > 1 sharpens.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance


@dataclass
class NoGuidance:
    """An unconditional model, sampled as it is."""

    needs_labels = False
    conditional_network = False
    p_uncond = 0.0

    def wrap(self, denoiser: Denoiser) -> nn.Module:
        """The denoiser itself."""
        return denoiser


@dataclass
class CFG:
    """Classifier-free guidance: label dropout with ``p_uncond`` in training, ``scale`` w."""

    scale: float = 3.0
    p_uncond: float = 0.1
    needs_labels = True
    conditional_network = True

    def __post_init__(self) -> None:
        if not 0.0 < self.p_uncond < 1.0:
            raise ValueError(f"guidance.p_uncond must be in (0, 1), got {self.p_uncond}")

    def wrap(self, denoiser: Denoiser) -> nn.Module:
        """w eps(x_t, y) + (1 - w) eps(x_t, null), null = the network's num_classes."""
        return ClassifierFreeGuidance(denoiser, self.scale, null_label=denoiser.network.num_classes)


@dataclass
class ClassifierGuided:
    """Classifier guidance: an unconditional model plus w grad log p_phi(y | x_t).

    ``classifier``: a checkpoint from ``python -m diffexp.train_classifier``, or ``oracle`` for the
    exact classifier of a Gaussian-mixture data set.
    """

    classifier: str = "oracle"
    scale: float = 1.0
    needs_labels = True
    conditional_network = False
    p_uncond = 0.0

    def wrap(self, denoiser: Denoiser, mixture=None) -> nn.Module:
        """score + w grad log p_phi(y | x_t)."""
        return ClassifierGuidance(denoiser, self.load_classifier(mixture), self.scale)

    def load_classifier(self, mixture=None) -> nn.Module:
        """The noisy classifier: the mixture's exact one, or a trained checkpoint."""
        if self.classifier == "oracle":
            if mixture is None:
                raise ValueError(
                    "guidance.classifier=oracle needs a Gaussian-mixture data set; train a "
                    "classifier with `python -m diffexp.train_classifier data=...` and pass "
                    "guidance.classifier=<its checkpoints/last.ckpt>"
                )
            from diffexp.networks.oracle import OracleClassifier

            return OracleClassifier(mixture)
        from diffexp.classifier_module import load_noisy_classifier

        return load_noisy_classifier(self.classifier)
