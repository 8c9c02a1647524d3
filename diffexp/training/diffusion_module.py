"""One LightningModule for every objective: it trains a Denoiser on a weighted ELBO.

An objective is a weighting w(lambda), a density p(lambda) of training noise levels and the
Denoiser's parameterization (MATH.md section 9), composed by ``diffusion.loss.WeightedLoss``:
training draws lambda ~ p (low-discrepancy), noises the batch and minimizes 1/2 (w / p)
||eps_hat - eps||^2. The true ELBO is reported by the ``ELBOMonitor`` callback on validation,
whatever the objective.
EMA weights (``training.ema.EMA``) are what is evaluated and sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from diffexp.cli import EXIT_FAILED
from diffexp.data.datamodules import derive_seed, split_batch
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import ReconstructionNLL, gaussian_reconstruction_nll
from diffexp.diffusion.loss import HEAVY_TAILED_SPREAD, LossOutput, WeightedLoss
from diffexp.diffusion.noise_sampling import Adaptive, NoiseSampling, ScheduleTimes
from diffexp.diffusion.schedules import Learned, Schedule
from diffexp.diffusion.weighting import ELBO, Weighting
from diffexp.training.ema import EMA, EMAWarmup
from diffexp.training.optim import optimizers_with_schedule
from diffexp.training.resume import data_position, reopen_stopped_epoch, start_next_epoch

# the validation noise's seed stream (the data's streams are 0-4)
_VALIDATION_STREAM = 101


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN or infinite; the message names the step and term."""

    exit_code = EXIT_FAILED  # the message says what happened and what to do: no traceback


class DiffusionModule(pl.LightningModule):
    """Trains ``denoiser`` on ``weighting`` with noise levels from ``noise_sampling`` (default:
    the schedule's t ~ U(0, 1)); T = 0 is continuous time, T > 0 a T-step model.

    With ``p_uncond`` > 0 (classifier-free guidance) labels are dropped to the null token in
    training; validation conditions on the true labels (a conditional network's ELBO of
    log p(x | y)), or on none for an unconditional network.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        weighting: Weighting,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        T: int = 0,
        ema_decay: float | None = 0.999,
        schedule_lr: float | None = None,
        reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
        config: dict | None = None,
        p_uncond: float = 0.0,
        noise_sampling: NoiseSampling | None = None,
        reconstruction: str = "denoiser",
        grad_clip: Mapping[str, float | None] | None = None,
        compile_network: bool = False,
        ema_warmup: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.weighting = weighting
        self.objective = WeightedLoss(weighting, noise_sampling, reconstruction)
        # an adaptive p(lambda) is learned state: a submodule, so checkpoints and .to() carry it
        self.adaptive = noise_sampling if isinstance(noise_sampling, Adaptive) else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.T = int(T)
        self.schedule_lr = schedule_lr
        self.reconstruction_nll = reconstruction_nll
        self.config = config or {}
        self.p_uncond = float(p_uncond)
        # max gradient norm per parameter group (GRAD_CLIP_GROUPS), each group clipped alone
        self.grad_clip = {k: float(v) for k, v in (grad_clip or {}).items() if v is not None}
        self.compile_network = bool(compile_network)
        if "schedule" in self.grad_clip and not any(
            p.requires_grad for p in denoiser.schedule.parameters()
        ):
            raise ValueError(
                f"model.grad_clip.schedule={self.grad_clip['schedule']}: the schedule "
                f"({type(denoiser.schedule).__name__}) has no trained parameters to clip. Clip "
                "the network only (model.grad_clip={network:1.0}), or train a learned schedule "
                "(schedule=learned)."
            )
        check_objective(self.objective, denoiser.schedule, self.T, denoiser.parameterization)
        self._noise_generator: torch.Generator | None = None
        self._pending_noise_state: Tensor | None = None
        self.validation_generator: torch.Generator | None = None
        self._pending_torch_rng_state: Tensor | None = None
        self._rank_seed: int | None = None
        # the first non-finite training loss: ([step, epoch, batch], [loss, terms]) on the device
        self._first_nonfinite: tuple[Tensor, Tensor] | None = None
        self._nonfinite_names: list[str] = []
        self._defer_finite_check = False  # an accelerator's step checks without a sync
        self.ema: EMA | None = None
        if ema_decay is not None and 0.0 < ema_decay < 1.0:
            # the warm-up's decay rises to ema_decay (training.ema.EMAWarmup); null: fixed decay
            self.ema = EMA(denoiser, ema_decay, EMAWarmup.of(ema_warmup, "model.ema_warmup"))
        elif ema_warmup is not None:
            raise ValueError(
                f"model.ema_warmup={ema_warmup} warms up an EMA, but model.ema_decay="
                f"{'null' if ema_decay is None else ema_decay} disables it. Set "
                "model.ema_decay=0.999 (the warm-up's maximum), or model.ema_warmup=null."
            )

    def setup(self, stage: str) -> None:
        """Each DDP rank draws its own noise: this rank's seed is the run's offset by the rank
        (the global RNG is left as ``seed_everything`` set it)."""
        self._rank_seed = int(torch.initial_seed()) + self.trainer.global_rank
        self._defer_finite_check = self.device.type != "cpu"
        if self.compile_network and stage == "fit":
            compile_in_place(self.denoiser.network)

    @property
    def rank_seed(self) -> int:
        """The seed of this rank's noise and validation generators (the run's seed + rank)."""
        return self._rank_seed if self._rank_seed is not None else int(torch.initial_seed())

    @property
    def noise_generator(self) -> torch.Generator:
        """The training noise's own RNG (t, eps, label dropout): saved in checkpoints, so a
        resumed run draws what the uninterrupted run drew, whatever else used the global RNG."""
        if self._noise_generator is None or self._noise_generator.device != self.device:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.rank_seed % (2**63))
            if self._pending_noise_state is not None:
                gen.set_state(self._pending_noise_state)
                self._pending_noise_state = None
            self._noise_generator = gen
        return self._noise_generator

    def on_validation_epoch_start(self) -> None:
        """Every validation draws the same noise (its own generator, seeded from the run's seed):
        its numbers depend on the weights alone, so a resumed run validates as the
        uninterrupted one did, and successive validations differ only by training."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.rank_seed % 2**32, _VALIDATION_STREAM))
        self.validation_generator = gen

    @property
    def schedule(self) -> Schedule:
        """The noise schedule being trained (or held fixed)."""
        return self.denoiser.schedule

    @property
    def eval_denoiser(self) -> Denoiser:
        """The denoiser to evaluate and sample: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.denoiser

    def has_trainable_parameters(self) -> bool:
        """Whether there is anything to optimize (the oracle with a fixed schedule has not)."""
        return any(p.requires_grad for p in self.denoiser.parameters())

    def _loss(self, batch: Any, denoiser: Denoiser, training: bool = False):
        x0, y = split_batch(batch)
        if y is not None and training and self.p_uncond > 0:
            y = self.drop_labels(y)
        gen = self.noise_generator if training else self.validation_generator
        return self.objective(
            denoiser, x0, y, T=self.T, reconstruction_nll=self.reconstruction_nll, generator=gen
        )

    def drop_labels(self, y: Tensor) -> Tensor:
        """Classifier-free guidance's training: y -> null token with probability p_uncond."""
        null = getattr(self.denoiser.network, "num_classes", 0)
        drop = torch.rand(y.shape, device=y.device, generator=self.noise_generator) < self.p_uncond
        return torch.where(drop, torch.full_like(y, null), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if getattr(self.schedule, "interior_objective", "elbo") == "variance":
            with self.schedule.scaled_interior_gradient() as holder:
                out = self._loss(batch, self.denoiser, training=True)
            holder.scale = self._variance_gradient_scale(out)
        else:
            out = self._loss(batch, self.denoiser, training=True)
        self._watch_finite(out, batch_idx)
        if self.adaptive is not None:
            self._update_adaptive(out)
        if self._is_logging_step():
            n = split_batch(batch)[0].shape[0]
            self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
            for k, v in out.terms.items():
                self.log(f"train/{k}", v, batch_size=n)
        return out.loss

    def _update_adaptive(self, out: LossOutput) -> None:
        """Fold this step's weighted losses 1/2 w ||eps_hat - eps||^2 = diffusion / (1/p) into the
        adaptive density's histogram, summed over the DDP ranks (every rank keeps the same)."""
        stats = self.adaptive.observe(self.schedule, out.log_snr, out.diffusion / out.inv_density)
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        self.adaptive.update(stats)

    def _watch_finite(self, out: LossOutput, batch_idx: int) -> None:
        """Stop on a non-finite loss, naming the step and the term. On a CPU at once; on an
        accelerator without a host-device sync in the step: the first bad step and its terms are
        kept on the device and checked on logging steps and before every checkpoint (the
        parameters may turn non-finite meanwhile; no checkpoint of them is written)."""
        if not self._defer_finite_check:
            if not torch.isfinite(out.loss):
                self._record_nonfinite(out, batch_idx)
                self.check_finite()
            return
        self._record_nonfinite(out, batch_idx)
        if self._is_logging_step():
            self.check_finite()

    def _record_nonfinite(self, out: LossOutput, batch_idx: int) -> None:
        """Keep the step, epoch, batch, loss and terms of the first non-finite loss on the device
        (Python numbers enter the kernels as arguments: no host-to-device copy)."""
        values = torch.stack([out.loss.detach(), *(v.detach() for v in out.terms.values())])
        if self._first_nonfinite is None:
            self._nonfinite_names = ["loss", *out.terms]
            self._first_nonfinite = (
                torch.full((3,), -1, dtype=torch.long, device=values.device),
                torch.zeros_like(values),
            )
        where, first_values = self._first_nonfinite
        new = ~torch.isfinite(values[0]) & (where[0] < 0)
        where = torch.stack(
            [
                torch.where(new, v, w)
                for v, w in zip(
                    (self.global_step, self.current_epoch, batch_idx), where, strict=True
                )
            ]
        )
        self._first_nonfinite = (where, torch.where(new, values, first_values))

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` if a training loss so far was not finite (a host-device
        sync)."""
        if self._first_nonfinite is None:
            return
        where, values = (t.tolist() for t in self._first_nonfinite)
        if where[0] < 0:
            return
        step, epoch, batch_idx = where
        values = dict(zip(self._nonfinite_names, values, strict=True))
        bad = [k for k, v in values.items() if k != "loss" and not math.isfinite(v)]
        listed = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "loss")
        raise NonFiniteLossError(
            f"non-finite training loss {values['loss']} at step {step} (epoch {epoch}, batch "
            f"{batch_idx}); offending term(s): {bad or ['loss']}; terms: {listed}. Lower "
            "model.optimizer.lr, check the data for NaN/inf, or use a schedule whose log-SNR "
            "endpoints are finite."
        )

    def _variance_gradient_scale(self, out: LossOutput) -> Tensor:
        """VDM's variance objective for a learned schedule's interior: factors 2 L_i on the
        interior's per-example gradient, so that the loss's backward pass gives it
        d/d eta mean(L^2) = mean(2 L dL/d eta) (L: the one-sample diffusion term) while the
        endpoints and the network get the ELBO's gradient; no extra backward pass. Scaled,
        accumulated and all-reduced with the rest of the gradient.

        Continuous time only (T = 0): only there is E[L] independent of the interior, so that
        E[L^2] is the variance plus a constant. The interior's gradient is in nats^2: global-norm
        gradient clipping would let it dominate the network's norm; clip per group or not at all.
        """
        diffusion = out.diffusion.detach()
        if self._is_logging_step():
            self.log("train/diffusion_std", diffusion.std(), batch_size=len(diffusion))
        return 2.0 * diffusion

    def _is_logging_step(self) -> bool:
        """Whether the loggers will write this step (``self.log`` costs ~0.5 ms a call on CPU)."""
        trainer = self._trainer  # the public .trainer raises when the module is not attached
        if trainer is None or trainer.fast_dev_run:
            return True
        # Lightning's own rule, from public attributes (its counter equals global_step here)
        return (self.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Step labels continue from the checkpoint as in the uninterrupted run. Lightning's
        restart adds one to its logging counter (``_batches_that_stepped``) for checkpoints
        written before the counter moves; ours are written at an epoch's end, after it moved. With
        one optimizer the counter equals ``global_step`` by definition, so it is set to that."""
        loop = self.trainer.fit_loop.epoch_loop
        # no public API sets the logging counter; it is the loop's own checkpointed state
        if loop._batches_that_stepped != self.global_step and len(self.trainer.optimizers) == 1:
            loop._batches_that_stepped = self.global_step

    def on_train_start(self) -> None:
        """A run resumed inside an epoch continues that epoch's data where the checkpoint was
        written (the loader restarts the epoch; its first batches are skipped), and the global
        RNG (dropout) where it was."""
        if self._pending_torch_rng_state is not None:
            torch.set_rng_state(self._pending_torch_rng_state)
            self._pending_torch_rng_state = None
        trainer = self.trainer
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        skip = data_position(
            self.global_step,
            self.current_epoch,
            trainer.num_training_batches,
            trainer.accumulate_grad_batches,
        )
        if skip and callable(getattr(sampler, "resume_at", None)):
            sampler.resume_at(self.current_epoch, skip)

    def on_train_end(self) -> None:
        """The steps since the last logging step are checked too."""
        self.check_finite()

    def on_train_epoch_start(self) -> None:
        """The epoch's data order from the epoch number (Lightning's count is off after resume)."""
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.current_epoch)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the EMA's: before any callback's ``on_train_batch_end``, so
        a checkpoint written there holds the EMA of the step it is labelled with."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.denoiser)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self._loss(batch, self.eval_denoiser)
        n = split_batch(batch)[0].shape[0]
        self.log("val/loss", out.loss, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> Any:
        schedule_params = [p for p in self.schedule.parameters() if p.requires_grad]
        ids = {id(p) for p in schedule_params}
        other = [p for p in self.denoiser.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": other, "name": "network"}] if other else []
        if schedule_params:
            group = {"params": schedule_params, "name": "schedule"}
            if self.schedule_lr is not None:
                group["lr"] = self.schedule_lr
            groups.append(group)
        return optimizers_with_schedule(self.optimizer_factory(groups), self.lr_scheduler_factory)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The trainer's clipping (``trainer.gradient_clip_val``, over all parameters), then
        ``grad_clip``'s: g <- g min(1, c / ||g||) with ||g|| the norm of one parameter group's
        gradient only (a learned schedule's variance gradient is in nats^2: clipped with the
        network's, it would set the network's scale). Logs each clipped group's norm before."""
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in optimizer.param_groups:
            max_norm = self.grad_clip.get(group.get("name", ""))
            if max_norm is None:
                continue
            norm = torch.nn.utils.clip_grad_norm_(group["params"], max_norm, foreach=True)
            if self._is_logging_step():
                self.log(f"train/grad_norm/{group['name']}", norm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the config (to rebuild the model) and the RNGs (to resume exactly): the
        training noise's generator of every rank, and the global one (dropout). Never the
        weights after a non-finite loss: that raises here, before anything is written."""
        self.check_finite()
        checkpoint["diffexp_config"] = self.config
        state = self.noise_generator.get_state()
        checkpoint["noise_rng_state"] = state
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank calls this
            gathered = self.all_gather(state.to(self.device))
            checkpoint["noise_rng_states"] = [s.cpu() for s in gathered]
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        for logger in self.trainer.loggers if self._trainer is not None else ():
            if type(logger).__name__ == "WandbLogger":  # a resumed run continues this W&B run
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNGs, so a resumed run draws the noise the uninterrupted one did; a
        checkpoint written at an epoch's end resumes at the next epoch's start."""
        start_next_epoch(checkpoint) or reopen_stopped_epoch(checkpoint)
        state = checkpoint.get("noise_rng_state")
        per_rank = checkpoint.get("noise_rng_states")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if per_rank is not None and rank < len(per_rank):
            state = per_rank[rank]
        if state is not None:
            self._pending_noise_state = state
            self._noise_generator = None
        self._pending_torch_rng_state = checkpoint.get("torch_rng_state")


def compile_in_place(network: torch.nn.Module) -> None:
    """``torch.compile`` the network's forward in place (``nn.Module.compile``): its parameters
    and state-dict keys are unchanged, so checkpoints and the EMA copy (eager) are as without.
    The loss, the schedule and the ELBO stay Python."""
    if getattr(network, "_compiled_call_impl", None) is None:
        network.compile()


def check_objective(
    objective: WeightedLoss, schedule: Schedule, T: int, parameterization: Any = None
) -> None:
    """Refuse the combinations of weighting, noise sampling, schedule and T that cannot work;
    warn when the density makes the loss's importance weights heavy-tailed."""
    sampling = objective.noise_sampling
    if not isinstance(sampling, ScheduleTimes):
        sampling.check(schedule, T)
        if isinstance(schedule, Learned):
            raise ValueError(
                f"a learned schedule trains its shape through p(lambda) of t ~ U(0, 1), but "
                f"noise_sampling={sampling.name} draws lambda without it; use "
                "noise_sampling=schedule with schedule=learned, or a fixed schedule"
            )
        if parameterization is not None:
            warn_heavy_tailed_weights(objective, schedule, parameterization)
    if getattr(schedule, "interior_objective", "elbo") == "variance":
        check_variance_objective(objective.weighting, T)


def warn_heavy_tailed_weights(
    objective: WeightedLoss, schedule: Schedule, parameterization
) -> None:
    """A warning (not an error: studying it is legitimate) when w / p is heavy-tailed."""
    spread = objective.importance_weight_spread(parameterization, schedule)
    if spread <= HEAVY_TAILED_SPREAD:
        return
    own = WeightedLoss(objective.weighting).importance_weight_spread(parameterization, schedule)
    if spread > 10 * own:
        rank_zero_warn(
            f"noise_sampling={objective.noise_sampling.name} with "
            f"weighting={objective.weighting.name}: the largest term of the loss estimate, "
            f"w/p times a perfect denoiser's error, is {spread:.3g} times its mean on the "
            f"log-SNR range (noise_sampling=schedule: "
            f"{own:.3g}); the loss estimate is heavy-tailed, so training is noisy and may end "
            "far from the objective's optimum. A density with more mass where w is large "
            "(e.g. noise_sampling=schedule) fixes it."
        )


def check_variance_objective(weighting: Weighting, T: int) -> None:
    """VDM's variance objective needs the continuous-time ELBO: refuse anything else."""
    if not isinstance(weighting, ELBO):
        raise ValueError(
            "schedule.interior_objective=variance minimizes the variance of the ELBO's "
            f"diffusion term, but weighting={weighting.name} does not train on the ELBO; "
            "use weighting=elbo (or schedule=learned for an interior trained on the loss)"
        )
    if T > 0:
        raise ValueError(
            f"schedule.interior_objective=variance needs continuous time (model.T=0), got "
            f"model.T={T}: a T-step model's ELBO depends on the schedule's interior, so "
            "E[L^2] is not its variance; use schedule=learned for a T-step model"
        )
