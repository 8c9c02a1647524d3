"""Networks conditioned on log-SNR: an MLP for vectors and the Gaussian-mixture oracle."""

from diffexp.networks.mlp import MLP
from diffexp.networks.oracle import Oracle, OracleClassifier

__all__ = ["MLP", "Oracle", "OracleClassifier"]
