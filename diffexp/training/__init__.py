"""Lightning: what runs inside ``fit()``.

``diffusion_module`` (the DiffusionModule: the weighted ELBO as a training step),
``classifier_module`` (noisy classifiers for guidance), ``optim`` (optimizers, the LR schedule,
EMA), ``callbacks/`` (last.ckpt, ELBO terms, samples, FID), ``checkpoint_io`` (atomic writes, safe
reads), ``resume`` (what an exactly resumed run needs), ``preemption`` (signals, SLURM requeue),
``loggers`` (loggers, the W&B lifecycle, the CSV log continued on resume). Imports the layers
below (``diffusion``, ``data``, ``metrics``, ``networks``), never ``build`` or an entry point.
"""
