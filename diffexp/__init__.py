"""diffexp: diffusion models as weighted ELBOs, run as configured experiments.

The map, bottom layer first (a layer imports only itself and the layers listed before it;
tests/test_layers.py checks it):

- ``cli``: the command-line contract (ConfigError, exit codes, ``run_cli``).
- ``diffusion/``: the paper in plain PyTorch: noise levels, schedules, parameterizations, the
  Denoiser seam, the ELBO, weighting x noise sampling x loss, samplers, likelihood, guidance.
- ``data/``: Gaussian mixtures with exact densities, 2-D toys, image data sets, data modules.
- ``metrics/``: numbers from samples and models: sample KL, sliced Wasserstein, FID/KID, plots.
- ``networks/``: nn.Modules conditioned on log-SNR: MLP, UNet, noisy classifiers, the oracle.
- ``training/``: Lightning, what runs inside ``fit()``: the LightningModules, optimizers and EMA,
  callbacks, checkpoint I/O, exact resume, preemption, loggers.
- ``build/``: from a composed config to parts: checks before compute, the factory, guidance
  specs, loading a trained run.
- entry points (``python -m diffexp.<name>``): ``train``, ``eval``, ``sample``, ``compare``,
  ``objectives``, ``train_classifier``, ``train_features``.
"""
