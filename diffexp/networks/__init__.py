"""Networks conditioned on log-SNR: the MLP (vectors), the UNet (images), noisy classifiers
(``classifier``) and the Gaussian-mixture oracle; they import nothing above ``data``."""

from diffexp.networks.mlp import MLP
from diffexp.networks.oracle import Oracle, OracleClassifier

__all__ = ["MLP", "Oracle", "OracleClassifier"]
