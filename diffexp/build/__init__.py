"""From a composed config to parts.

``checks`` (options refused before any compute), ``factory`` (datamodule, network, denoiser,
DiffusionModule, sampler), ``guidance_specs`` (what ``conf/guidance`` instantiates: how a
denoiser is wrapped for sampling), ``runs`` (loading a trained run for eval and sample). The
Trainer, its loggers and callbacks are made for a run by ``training.loggers.training_run``.
"""
