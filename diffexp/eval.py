"""Evaluate a model: ``python -m diffexp.eval run=<folder> | ckpt=<file> | network=oracle``.

Writes ``metrics.json`` to its output folder: the ELBO's terms on the test split (nats per
example, bits/dim), the true log-likelihood when the data knows it, and sample metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from diffexp.build.checks import check_eval
from diffexp.build.grids import load_grid_times
from diffexp.build.runs import check_request
from diffexp.cli import CONF_DIR, refusing_bad_input, run_cli, task_overrides

if TYPE_CHECKING:
    from torch import Tensor, nn

    from diffexp.build.runs import LoadedModel

# torch, Lightning and the metrics are imported where they are used: a refusal of the command
# line (build.checks, build.runs.check_request) comes before them, in about a second (0.6 s for
# split=foo here; a bad sampler setting, checked by building the sampler with torch, in 4 s)


def _mean_se(values: list[Tensor]) -> tuple[float, float]:
    import torch

    v = torch.cat(values).double()
    return v.mean().item(), (v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else math.nan)


def split_loader(model: LoadedModel, split: str) -> Any:
    """The loader of the evaluated split (test, else validation), its data set up."""
    dm = model.datamodule
    dm.setup("test" if split == "test" else "validate")
    return dm.test_dataloader() if split == "test" else dm.val_dataloader()


def split_batches(model: LoadedModel, cfg: DictConfig) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The evaluated split's batches as (x0, y) on ``cfg.device`` (y None when unlabelled)."""
    from diffexp.data.datamodules import split_batch

    for batch in split_loader(model, cfg.split):
        x0, y = split_batch(batch)
        yield x0.to(cfg.device), (None if y is None else y.to(cfg.device))


def elbo_report(model: LoadedModel, cfg: DictConfig) -> dict[str, Any]:
    """ELBO terms on the configured split, means and standard errors, nats and bits/dim."""
    import torch

    from diffexp.diffusion.elbo import elbo_terms
    from diffexp.metrics.elbo import elbo_metrics

    dm = model.datamodule
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    per_example: dict[str, list[Tensor]] = {}
    for x0, y in split_batches(model, cfg):
        terms = elbo_terms(
            model.denoiser,
            x0,
            y,
            T=model.T,
            n_t=int(cfg.n_t),
            generator=gen,
            max_elements=cfg.max_elements,
            reconstruction_nll=model.reconstruction_nll,
        )
        metrics = elbo_metrics(terms, x0[0].numel(), list(cfg.band_edges))
        if model.T > 0 and cfg.exact_loop:
            exact = elbo_terms(
                model.denoiser,
                x0,
                y,
                T=model.T,
                exact=True,
                n_t=1,
                generator=gen,
                max_elements=cfg.max_elements,
                reconstruction_nll=model.reconstruction_nll,
            )
            metrics["elbo_exact_loop_nats"] = exact.elbo
            metrics["bpd_exact_loop"] = exact.bits_per_dim(x0[0].numel())
        true_lp = dm.true_log_prob(x0)
        if true_lp is not None:
            metrics["true_log_likelihood_nats"] = true_lp
            metrics["elbo_gap_nats"] = true_lp - terms.elbo
        for k, v in metrics.items():
            per_example.setdefault(k, []).append(v.detach().cpu())
    out: dict[str, Any] = {}
    for k, values in per_example.items():
        out[k], se = _mean_se(values)
        if k in ("elbo_nats", "bpd", "elbo_gap_nats", "diffusion_nats", "reconstruction_nats"):
            out[f"{k}_se"] = se
    out["n_examples"] = sum(v.numel() for v in per_example["elbo_nats"])
    return out


def sample_report(
    model: LoadedModel,
    cfg: DictConfig,
    out_dir: Path,
    denoiser: nn.Module | None = None,
    labels: Tensor | None = None,
) -> dict[str, Any]:
    """Sliced Wasserstein to held-out data (and its floor), samples' true log-density, a plot.

    ``denoiser`` / ``labels``: the guided model and the labels to sample, as ``guided_denoiser``
    and ``sampling_labels`` give them (made here when not given)."""
    import torch

    n = int(cfg.n_samples)
    if n <= 0:
        return {}
    if denoiser is None:
        denoiser, labels = guided_model(model, cfg)
    with torch.no_grad():
        return _sample_report(model, cfg, out_dir, denoiser, labels)


def guided_model(model: LoadedModel, cfg: DictConfig) -> tuple[nn.Module, Tensor | None]:
    """The guided denoiser and the labels to sample (``n_samples`` of them), checked: a refusal
    (guidance=cfg on an unconditional model, a label it cannot honour) comes before any
    compute."""
    from diffexp.build.runs import guided_denoiser, sampling_labels

    denoiser = guided_denoiser(model, cfg)
    return denoiser, sampling_labels(cfg, model, denoiser, max(int(cfg.n_samples), 1), cfg.device)


def _sample_report(
    model: LoadedModel, cfg: DictConfig, out_dir: Path, denoiser: nn.Module, labels: Any
) -> dict[str, Any]:
    import torch

    from diffexp.build.factory import build_sampler
    from diffexp.build.runs import describe_guidance
    from diffexp.metrics.plots import plot_samples
    from diffexp.metrics.sample_kl import sample_kl
    from diffexp.metrics.sliced_wasserstein import sliced_wasserstein

    n = int(cfg.n_samples)
    dm = model.datamodule
    sampler = build_sampler(cfg.sampler, cfg.get("steps"), load_grid_times(cfg))
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed) + 1)
    chunks, nfe = [], 0
    for start in range(0, n, int(cfg.batch_size)):
        size = min(int(cfg.batch_size), n - start)
        y = None if labels is None else labels[start : start + size]
        result = sampler.sample(denoiser, (size, *dm.shape), y=y, generator=gen, device=cfg.device)
        chunks.append(result.x.cpu())
        nfe = result.nfe
    x = torch.cat(chunks)
    if len(dm.shape) == 3:
        report = image_report(x, model, cfg, out_dir, sampler, nfe)
        if labels is not None and cfg.get("classifier_accuracy", True):
            report.update(label_accuracy(x, labels.cpu(), model, cfg))
        report["guidance"] = describe_guidance(denoiser, model.denoiser)
        return report
    ref, ref2 = dm.reference(n, seed=10_000), dm.reference(n, seed=10_001)
    proj = int(cfg.n_projections)
    report: dict[str, Any] = {
        "sampler": repr(sampler),
        "nfe": nfe,
        "n_samples": n,
        "sliced_wasserstein": sliced_wasserstein(x, ref, n_projections=proj, seed=0),
        "sliced_wasserstein_floor": sliced_wasserstein(ref2, ref, n_projections=proj, seed=0),
    }
    report["sliced_wasserstein_ratio"] = (
        report["sliced_wasserstein"] / report["sliced_wasserstein_floor"]
    )
    if dm.true_log_prob(ref) is not None:
        report["sample_mean_log_density_nats"] = dm.true_log_prob(x.double()).mean().item()
        report["data_mean_log_density_nats"] = dm.true_log_prob(ref.double()).mean().item()
        report["sample_log_density_gap_nats"] = (
            report["sample_mean_log_density_nats"] - report["data_mean_log_density_nats"]
        )
        # KL(p_hat || q) with the k-NN entropy (MATH.md s10); its floor: the same on ``ref``
        finite = bool(torch.isfinite(x).all())
        report["sample_kl_nats"] = sample_kl(x, dm.true_log_prob) if finite else math.nan
        report["sample_kl_floor_nats"] = sample_kl(ref, dm.true_log_prob)
    if x.shape[1] <= 3:
        plot_samples(x, ref, out_dir / "samples.png", f"{sampler!r}, NFE {nfe}")
    return report


def label_accuracy(x: Tensor, labels: Tensor, model: LoadedModel, cfg: DictConfig) -> dict:
    """How often the data's feature classifier recognizes the requested label in the samples."""
    from diffexp.metrics.features import classifier_accuracy, load_classifier

    data_cfg = model.config.data
    if (cfg.get("fid_features") or data_cfg.get("fid_features")) != "classifier":
        return {}
    path = cfg.get("fid_features_path") or data_cfg.get("fid_features_path")
    classifier = load_classifier(path)
    return {"classifier_accuracy": classifier_accuracy(classifier, x, labels)}


def image_report(
    x: Tensor, model: LoadedModel, cfg: DictConfig, out_dir: Path, sampler: Any, nfe: int
) -> dict[str, Any]:
    """FID / KID of the samples against the test split, and the FID between its two halves."""
    import torch

    from diffexp.data.datamodules import split_batch
    from diffexp.metrics.features import build_feature_extractor
    from diffexp.metrics.fid import fid_kid
    from diffexp.metrics.plots import save_image_grid
    from diffexp.training.loggers import log

    dm = model.datamodule
    data_cfg = model.config.data
    kind = cfg.get("fid_features") or data_cfg.get("fid_features")
    path = cfg.get("fid_features_path") or data_cfg.get("fid_features_path")
    # with labels cycling through the classes, each column of the grid is one class
    nrow = min(int(getattr(dm, "num_classes", 0)) or 8, 10) if cfg.get("label") is None else 8
    save_image_grid(x[: nrow * nrow], out_dir / "samples.png", nrow=nrow)
    report: dict[str, Any] = {"sampler": repr(sampler), "nfe": nfe, "n_samples": x.shape[0]}
    if not kind:
        log.warning("no FID feature extractor configured (fid_features); skipping FID")
        return report
    extractor = build_feature_extractor(kind, path).to(cfg.device)
    dm.setup("test")
    real = torch.cat([split_batch(b)[0] for b in dm.test_dataloader()])
    scores = fid_kid(real, x, extractor, batch_size=int(cfg.batch_size))
    floor = fid_kid(real[0::2], real[1::2], extractor, batch_size=int(cfg.batch_size))
    dm.setup("fit")
    train = torch.cat([split_batch(b)[0] for b in dm.train_dataloader()])[: x.shape[0]]
    matched = fid_kid(real, train, extractor, batch_size=int(cfg.batch_size))
    report.update(
        {
            "fid": scores["fid"],
            "kid_mean": scores["kid_mean"],
            "kid_std": scores["kid_std"],
            "fid_real_halves": floor["fid"],
            "fid_real_train": matched["fid"],
            "fid_protocol": {
                "extractor": scores["extractor"],
                "features_path": path,
                "n_fake": scores["n_fake"],
                "n_real": scores["n_real"],
                "real": f"{cfg.split} split",
                "floor": f"fid_real_halves: FID between the two halves of the {cfg.split} split "
                f"({floor['n_real']} vs {floor['n_fake']} images; smaller n, so biased up); "
                f"fid_real_train: {matched['n_fake']} training images against the {cfg.split} "
                "split (the sample FID's floor at the same sizes)",
                "nfe": nfe,
                "ema": bool(cfg.get("use_ema", True)),
            },
        }
    )
    return report


def ode_likelihood_report(model: LoadedModel, cfg: DictConfig) -> dict[str, Any]:
    """Exact log-likelihood through the probability-flow ODE on the first examples of the split."""
    import torch

    from diffexp.diffusion.likelihood import ode_log_likelihood

    n = int(cfg.ode_likelihood.n_examples)
    if n <= 0:
        return {}
    dm = model.datamodule
    x0, y = next(split_batches(model, cfg))
    x0, y = x0[:n], (None if y is None else y[:n])
    if not getattr(model.denoiser.network, "num_classes", 0):
        y = None
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed) + 2)
    out = ode_log_likelihood(
        model.denoiser,
        x0,
        y,
        rtol=float(cfg.ode_likelihood.rtol),
        atol=float(cfg.ode_likelihood.atol),
        generator=gen,
    )
    log_p = out["log_likelihood_nats"].double().cpu()
    report = {
        "ode_log_likelihood_nats": log_p.mean().item(),
        "ode_log_likelihood_nats_se": log_p.std().item() / math.sqrt(max(len(log_p) - 1, 1)),
        "ode_bpd": out["bpd"].double().mean().item(),
        "ode_nfe": int(out["nfe"]),
        "ode_n_examples": len(log_p),
        "ode_convention": "log-density of the data as given (continuous; no dequantization), "
        "blurred by N(0, sigma_0^2) at the schedule's t = 0",
    }
    true_lp = dm.true_log_prob(x0)
    if true_lp is not None:
        report["ode_true_log_likelihood_nats"] = true_lp.double().mean().item()
    return report


def estimators_report(model: LoadedModel, cfg: DictConfig) -> dict[str, Any]:
    """Spread of one-sample ELBO estimators: the two forms at each T, and other schedules."""
    import torch

    from diffexp.build.factory import fixed_schedule
    from diffexp.metrics.estimators import flatten, forms_report, schedules_report

    est = cfg.get("estimators") or {}
    steps, names = list(est.get("forms_T") or []), list(est.get("schedules") or [])
    if not steps and not names:
        return {}
    batches = list(split_batches(model, cfg))
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed) + 3)
    n_repeats = int(est.get("n_repeats", 1))
    args = (model.denoiser, batches)
    kwargs = {"reconstruction_nll": model.reconstruction_nll, "generator": gen}
    report: dict[str, Any] = {}
    if steps:
        report.update(flatten("forms", forms_report(*args, steps, n_repeats=n_repeats, **kwargs)))
    if names:
        ends = model.denoiser.schedule.endpoints
        own = model.denoiser.schedule
        schedules = {n: own if n == "own" else fixed_schedule(n, *ends) for n in names}
        stats = schedules_report(*args, schedules, n_repeats=n_repeats, **kwargs)
        report.update(flatten("schedules", stats))
    report["estimators_convention"] = (
        "one-sample estimates of -ELBO (one time or step per example), nats per example, over "
        "n_repeats passes: <estimator>/nll_mean +- nll_se (over examples); nll_std: std of a "
        "one-sample estimate over examples, times and noise; nll_noise_std: its std for a fixed "
        "example; nll_diff_mean +- nll_diff_se: paired difference to the first estimator of the "
        "group (forms: denoising at the same T; schedules: the first listed); diffusion_*: the "
        "same for the diffusion part (the consistency form's excludes its prior term). "
        "schedules/* are continuous-time ELBOs (also for a T-step model)"
    )
    return report


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` and write metrics.json; returns the metrics.

    ``overrides``: the command line's (Hydra's task overrides); one of what the checkpoint defines
    (data, network, schedule, ...) that differs from its stored config is refused. Everything that
    can be refused is, right after the model is loaded and before any compute.
    """
    from diffexp.build.runs import load_model

    out_dir = Path(cfg.paths.output_dir)
    model = load_model(
        cfg, device=cfg.device, overrides=overrides, need_data=True, seed=int(cfg.seed)
    )
    denoiser, labels = guided_model(model, cfg)
    from diffexp.training.loggers import log, write_json

    log_snr_max, log_snr_min = model.denoiser.schedule.endpoints
    metrics: dict[str, Any] = {
        "source": model.source,
        "split": cfg.split,
        "T": model.T,
        "n_t": int(cfg.n_t),
        "use_ema": bool(cfg.get("use_ema", True)),
        "log_snr_max": log_snr_max,
        "log_snr_min": log_snr_min,
        "convention": "nats per example; elbo_nats = -(reconstruction + prior + diffusion); "
        "bpd = -ELBO / (d ln 2) on the data as given (continuous data: a density, no "
        "dequantization)",
    }
    if model.posthoc_ema is not None:  # ema.sigma_rel: a reconstructed post-hoc EMA
        metrics["posthoc_ema"] = model.posthoc_ema
    metrics.update(elbo_report(model, cfg))
    metrics.update(ode_likelihood_report(model, cfg))
    metrics.update(estimators_report(model, cfg))
    metrics.update(sample_report(model, cfg, out_dir, denoiser, labels))
    path = write_json(out_dir / "metrics.json", metrics)
    log.info("wrote %s", path)
    print(
        f"ELBO {metrics['elbo_nats']:.4f} +- {metrics['elbo_nats_se']:.4f} nats/example "
        f"(bits/dim {metrics['bpd']:.4f})"
        + (
            f"; true log-likelihood {metrics['true_log_likelihood_nats']:.4f}"
            if "true_log_likelihood_nats" in metrics
            else ""
        )
        + f"; metrics in {path}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: the config's values checked first, then the evaluation."""
    with refusing_bad_input():
        check_eval(cfg)
        check_request(cfg)
        load_grid_times(cfg)  # sampler.time_grid=optimized: its file, checked against the sampler
        evaluate(cfg, overrides=task_overrides())


def run() -> None:
    """Console script ``diffexp-eval``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
