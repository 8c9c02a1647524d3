"""Loading a trained model (or the oracle) for evaluation and sampling.

A model comes from a training run's folder (``run=``: its ``checkpoints/last.ckpt``), from a
checkpoint file (``ckpt=``: the run's config is stored inside it), or, with neither, from the
configured network, which must then need no training (``network=oracle``). Checkpoints are read
with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere cannot run code.

Everything that can be told from the command line, the files named and the checkpoint's stored
config is checked before any evaluation or sampling starts, and refused with a ``ConfigError``
(one paragraph: the key, the value and the fix). This module imports torch and the training stack
only where a model is built, so the checks of ``check_request`` cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffexp.build.guidance_specs import check_classifier_option
from diffexp.cli import TRAIN_CLASSIFIER, ConfigError
from diffexp.training.resume import checkpoints_in

if TYPE_CHECKING:
    from torch import Tensor, nn

    from diffexp.diffusion.denoiser import Denoiser, DenoiserLike
    from diffexp.diffusion.elbo import ReconstructionNLL

# the parts of an eval / sample config that a checkpoint defines (its stored config is used):
# a command-line override of any of them would be ignored, so one that differs is refused
CHECKPOINT_KEYS = (
    "data",
    "network",
    "schedule",
    "parameterization",
    "model",
    "weighting",
    "noise_sampling",
)
_ABSENT = object()


@dataclass
class LoadedModel:
    """What evaluation and sampling need: the denoiser, its data, T, and where it came from."""

    denoiser: Denoiser
    datamodule: Any
    T: int
    source: str
    config: DictConfig
    # with ema.sigma_rel: how the post-hoc EMA was reconstructed (posthoc_ema_plan's report)
    posthoc_ema: dict[str, Any] | None = None

    @property
    def reconstruction_nll(self) -> ReconstructionNLL:
        """The data's decoder (discretized for images)."""
        from diffexp.build.factory import reconstruction_nll_of

        return reconstruction_nll_of(self.datamodule)


# ---------------------------------------------------------------------- the request alone
def check_request(cfg: DictConfig) -> None:
    """Checks of an eval / sample config that need no model: run / ckpt, label / labels, the
    classifier of classifier guidance, the device. Cheap (imports nothing heavy)."""
    if cfg.get("run") and cfg.get("ckpt"):
        raise ConfigError(
            f"run={cfg.run} and ckpt={cfg.ckpt} both name a model: give either run=<run folder> "
            "(it uses <folder>/checkpoints/last.ckpt) or ckpt=<checkpoint file>, not both."
        )
    chosen_labels(cfg)
    spec = instantiate(cfg.guidance) if cfg.get("guidance") else None  # a spec: no I/O
    if spec is not None and spec.needs_classifier:
        check_classifier_option(spec.classifier)
    device = str(cfg.get("device", "cpu"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device}, but this machine has no CUDA device that torch can use. "
                "Set device=cpu."
            )
    elif device != "cpu" and not device.startswith("mps"):
        raise ConfigError(f"device={device!r} is not a device: expected cpu or cuda (cuda:<k>).")
    posthoc_ema_plan(cfg)


def chosen_labels(cfg: DictConfig) -> list[int] | None:
    """The classes asked for by ``label=k`` or ``labels=[...]`` (None for neither), checked to be
    integers; whether they fit the model and the data is checked by ``sampling_labels``."""
    label, labels = cfg.get("label"), cfg.get("labels")
    if label is not None and labels is not None:
        raise ConfigError(
            f"label={label} and labels={_show(labels)} both choose the classes to sample: give "
            "label=<k> (every sample of class k) or labels=[k1,k2,...] (cycled), not both."
        )
    if label is not None:
        return [int(label)]  # an integer >= 0: the config rules checked it
    if labels is None:
        return None
    if not isinstance(labels, (list, tuple, ListConfig)):
        raise ConfigError(
            f"labels={_show(labels)} is not a list: expected a list of class indices, e.g. "
            "labels=[3,5] (or label=3 for one class)."
        )
    items = list(labels)
    bad = [k for k in items if isinstance(k, bool) or not isinstance(k, int) or k < 0]
    if bad:
        what = "which is not a class index" if len(bad) == 1 else "which are not class indices"
        raise ConfigError(
            f"labels={_show(labels)} holds {', '.join(repr(k) for k in bad)}, {what}: expected "
            "integers >= 0, e.g. labels=[3,5]."
        )
    return [int(k) for k in items] or None


def _show(value: Any) -> str:
    """A config value as the user would type it."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------- files
def resolve_checkpoint(run: str | None, ckpt: str | None) -> Path | None:
    """The checkpoint file named by ``run=`` (its last.ckpt) or ``ckpt=``; None for neither."""
    if run and ckpt:
        raise ConfigError(
            f"run={run} and ckpt={ckpt} both name a model: give either run=<run folder> "
            "(it uses <folder>/checkpoints/last.ckpt) or ckpt=<checkpoint file>, not both."
        )
    if run:
        run_dir = Path(str(run)).expanduser()
        if not run_dir.exists():
            raise ConfigError(
                f"run={run}: the run folder {run_dir} does not exist. Pass the output folder of "
                "a training run (python -m diffexp.train writes outputs/train/<date>/<time>/, "
                "with checkpoints/last.ckpt), or ckpt=<checkpoint file>."
            )
        if not run_dir.is_dir():
            raise ConfigError(
                f"run={run} is a file, not a run folder: pass ckpt={run} for a checkpoint file, "
                "or run=<the training run's output folder>."
            )
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            found = checkpoints_in(run_dir)
            fix = (
                f" (checkpoints found: {', '.join(str(p) for p in found[:5])}). Pass ckpt=<one "
                "of them> to choose one"
                if found
                else " and no other .ckpt file. Pass the folder of a run that trained to the end "
                "of an epoch (or to a checkpoint interval)"
            )
            raise ConfigError(
                f"run={run}: the run folder has no checkpoints/last.ckpt{fix}, or train "
                "(longer) so that last.ckpt is written."
            )
        return path
    if ckpt:
        path = Path(str(ckpt)).expanduser()
        if path.is_dir():
            found = checkpoints_in(path)
            hint = (
                f"run={ckpt} (it uses checkpoints/last.ckpt)"
                if (path / "checkpoints" / "last.ckpt").is_file()
                else "run=<the training run's output folder>"
            )
            listed = (
                "; checkpoint files inside: " + ", ".join(str(p) for p in found[:5])
                if found
                else "; it holds no .ckpt files"
            )
            raise ConfigError(
                f"ckpt={ckpt} is a directory, not a checkpoint file{listed}. Pass {hint}, or "
                "ckpt=<one of the files>."
            )
        if not path.is_file():
            raise ConfigError(
                f"ckpt={ckpt}: the checkpoint file {path} does not exist. Training runs write "
                "outputs/train/<date>/<time>/checkpoints/last.ckpt; pass that file, or "
                "run=<the run's folder>."
            )
        return path
    return None


# ---------------------------------------------------------------------- overrides
def checkpoint_overrides(
    cfg: DictConfig, stored: DictConfig, overrides: Sequence[str]
) -> list[str]:
    """The command-line ``overrides`` of what the checkpoint defines (``CHECKPOINT_KEYS``) whose
    value differs from the checkpoint's stored config, each described in words."""
    if not overrides:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        root = key.split(".")[0].split("/")[0]
        if root not in CHECKPOINT_KEYS or override.package:
            continue
        text = override.input_line or key
        if "." not in key:  # a config group: data=grid25
            diffs = _group_differences(cfg, stored, key)
            if diffs:
                problems.append(f"{text} ({diffs[0]})")
        else:
            mine, theirs = _select(cfg, key), _select(stored, key)
            if mine != theirs:
                problems.append(f"{text} (the checkpoint has {key}={_value(theirs)})")
    return problems


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
    except Exception:  # noqa: BLE001 - an unresolvable value differs from any stored one
        return _ABSENT
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _value(value: Any) -> str:
    return "(not set)" if value is _ABSENT else repr(value)


def _group_differences(cfg: DictConfig, stored: DictConfig, group: str) -> list[str]:
    """How the command line's ``group`` differs from the stored one: its class first, then the
    values set by the option itself (values interpolated from elsewhere, such as the seed or a
    path, are the run's, not the option's)."""
    mine, theirs = cfg.get(group), stored.get(group)
    if not isinstance(mine, DictConfig) or not isinstance(theirs, DictConfig):
        return [] if _select(cfg, group) == _select(stored, group) else [f"{group} differs"]
    target, stored_target = mine.get("_target_"), theirs.get("_target_")
    if target != stored_target:
        return [f"the checkpoint's {group} is {stored_target}, the command line's is {target}"]
    diffs = []
    for k in mine:
        if OmegaConf.is_interpolation(mine, k):
            continue
        a, b = _select(mine, str(k)), _select(theirs, str(k))
        if a != b:
            diffs.append(f"{group}.{k}: the checkpoint has {_value(b)}, the command line {a!r}")
    return diffs


def refuse_checkpoint_overrides(
    cfg: DictConfig, stored: DictConfig, overrides: Sequence[str], source: str
) -> None:
    """Refuse command-line overrides of what the checkpoint named by ``source`` defines."""
    problems = checkpoint_overrides(cfg, stored, overrides)
    if not problems:
        return
    texts = [p.split(" (")[0] for p in problems]
    raise ConfigError(
        f"{', '.join(problems)}: with {source} the checkpoint defines the data, network, "
        "schedule, parameterization and model.T (its stored config is used), so "
        f"{'this override would be' if len(problems) == 1 else 'these overrides would be'} "
        f"ignored. Drop {' '.join(texts)} from the command line; to use other data or another "
        "network, train a run with them."
    )


# ---------------------------------------------------------------------- the model
def load_model(
    cfg: DictConfig,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    need_data: bool = False,
    seed: int | None = None,
) -> LoadedModel:
    """The denoiser to evaluate or sample, per the ``run`` / ``ckpt`` / ``network`` options.

    ``overrides``: the command line's (Hydra's task overrides); one of what the checkpoint defines
    that differs from its stored config is refused. ``need_data``: the data's files must be there
    (evaluation reads the data; sampling needs only its shape). ``seed``: seeds everything
    (``pl.seed_everything``) once the request is checked, before the model is built.
    """
    path = resolve_checkpoint(cfg.get("run"), cfg.get("ckpt"))
    if path is None:
        from diffexp.build.factory import build_datamodule, build_denoiser

        _seed(seed)
        datamodule = build_datamodule(cfg.data, require_files=need_data)
        denoiser = build_denoiser(cfg, datamodule)
        if any(p.requires_grad for p in denoiser.network.parameters()):
            raise ConfigError(
                f"network {cfg.network.get('_target_')} has no trained weights here: pass "
                "run=<training run folder> or ckpt=<checkpoint>, or use network=oracle"
            )
        return LoadedModel(
            denoiser.to(device), datamodule, int(cfg.model.get("T", 0)), "oracle", cfg
        )
    from diffexp.training.checkpoint_io import (
        checkpoint_name,
        load_checkpoint,
    )  # torch and Lightning

    source = f"run={cfg.run}" if cfg.get("run") else f"ckpt={cfg.ckpt}"
    key = "run" if cfg.get("run") else "ckpt"
    posthoc = posthoc_ema_plan(cfg)  # refused before the checkpoint is read
    state = load_checkpoint(path, key=key)
    train_cfg = OmegaConf.create(state["diffexp_config"])
    refuse_checkpoint_overrides(cfg, train_cfg, overrides, source)
    from diffexp.build.factory import build_datamodule, build_module  # the training stack: seconds

    _seed(seed)
    datamodule = build_datamodule(train_cfg.data, require_files=need_data)
    module = build_module(train_cfg, datamodule)
    load_weights(module, state["state_dict"], checkpoint_name(path, key), train_cfg)
    denoiser = module.eval_denoiser if cfg.get("use_ema", True) else module.denoiser
    report = None
    if posthoc is not None:
        report = apply_posthoc_ema(denoiser, posthoc)
    denoiser.eval()
    return LoadedModel(denoiser.to(device), datamodule, module.T, str(path), train_cfg, report)


def _seed(seed: int | None) -> None:
    if seed is not None:
        import pytorch_lightning as pl

        pl.seed_everything(int(seed), verbose=False)


def load_weights(module: Any, weights: dict[str, Any], where: str, train_cfg: DictConfig) -> None:
    """``module.load_state_dict(weights)``; tensors that do not fit the network the stored config
    builds are refused in one paragraph (how many, the first ones with shapes, the fix)."""
    expected = module.state_dict()
    wrong = [
        (k, tuple(weights[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != v.shape
    ]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            shown = "; ".join(
                f"{k}: checkpoint {list(a)}, config {list(b)}" for k, a, b in wrong[:2]
            )
            parts.append(f"{len(wrong)} of {len(expected)} tensors differ in shape ({shown})")
        if missing:
            parts.append(f"{len(missing)} are missing from the checkpoint (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in the network (e.g. {unexpected[0]})")
        network = OmegaConf.to_container(train_cfg.get("network") or {}, resolve=True)
        described = ", ".join(f"{k}={v}" for k, v in network.items() if k != "_target_")
        raise ConfigError(
            f"{where}: its weights do not fit the network that its stored config "
            f"builds ({network.get('_target_', '?')}: {described}): {'; '.join(parts)}. The "
            "config inside the checkpoint (diffexp_config) does not describe these weights: it "
            "was changed after training, or the file was assembled from two runs. Use a "
            "checkpoint written by python -m diffexp.train as it is (run=<its run folder>), or "
            "retrain with the network you want."
        )
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{where}: its weights cannot be loaded: {first}") from None


# ---------------------------------------------------------------------- post-hoc EMA
@dataclass
class PostHocPlan:
    """A post-hoc EMA to evaluate: the snapshots, their coefficients and what to report."""

    snapshots: list[Any]
    coefficients: Any
    report: dict[str, Any]


def posthoc_ema_plan(cfg: DictConfig) -> PostHocPlan | None:
    """With ``ema.sigma_rel`` set: the reconstruction of that EMA from the run's snapshots
    (``training.posthoc_ema``), checked; None when unset. Refused (``ConfigError``): no run, a
    sigma_rel that no power-function EMA has, no snapshots, or snapshots that cannot represent
    the target profile within ``ema.max_error`` (relative L2). Reads only the snapshots'
    metadata (memory-mapped); imports torch only when set."""
    ema = cfg.get("ema") or {}
    sigma_rel = ema.get("sigma_rel")
    if sigma_rel is None:
        return None
    from diffexp.training.posthoc_ema import (
        DEFAULT_SIGMA_RELS,
        SIGMA_REL_MAX,
        plan_reconstruction,
        read_snapshots,
        sigma_rel_to_gamma,
    )

    tracked = ",".join(str(s) for s in DEFAULT_SIGMA_RELS)
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise ConfigError(
            f"ema.sigma_rel={sigma_rel!r} is not a number: expected the relative width of the EMA "
            f"to evaluate, 0 < sigma_rel <= {SIGMA_REL_MAX:.4f}, e.g. ema.sigma_rel=0.07 (EDM2 "
            f"tracks {tracked}), or null for the checkpoint's weights."
        )
    if not 0.0 < float(sigma_rel) <= SIGMA_REL_MAX:
        raise ConfigError(
            f"ema.sigma_rel={sigma_rel} is out of range: a power-function EMA's width relative to "
            f"the training time is in (0, {SIGMA_REL_MAX:.4f}] (sigma_rel = (g+1)^(1/2) / ((g+2) "
            f"(g+3)^(1/2)) for an exponent g > -1). Set ema.sigma_rel near the run's tracked "
            f"ones (callbacks.posthoc_ema.sigma_rels, by default {tracked}), e.g. "
            "ema.sigma_rel=0.07, or ema.sigma_rel=null for the checkpoint's weights."
        )
    max_error = ema.get("max_error", 0.05)
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or max_error <= 0:
        raise ConfigError(
            f"ema.max_error={max_error!r} is not a number > 0: expected the largest relative L2 "
            "distance between the reconstructed and the target EMA profile to accept, e.g. "
            "ema.max_error=0.05 (the default)."
        )
    if cfg.get("use_ema", True) is False:
        raise ConfigError(
            f"use_ema=false asks for the raw trained weights and ema.sigma_rel={sigma_rel} for a "
            "post-hoc EMA of them: drop one (ema.sigma_rel=null for the raw weights, or "
            "use_ema=true with ema.sigma_rel)."
        )
    run, ckpt, folder = cfg.get("run"), cfg.get("ckpt"), ema.get("dir")
    if folder is None:
        if not run and not ckpt:
            raise ConfigError(
                f"ema.sigma_rel={sigma_rel} reconstructs an EMA from a training run's snapshots, "
                "but no run is given (the configured network has no training). Pass "
                "run=<a run trained with callbacks=posthoc_ema>, or drop ema.sigma_rel."
            )
        # a checkpoint file is <run>/checkpoints/<name>.ckpt
        base = Path(str(run)) if run else Path(str(ckpt)).expanduser().resolve().parent.parent
        folder = base.expanduser() / "posthoc_ema"
    folder = Path(str(folder)).expanduser()
    where = f"ema.dir={folder}" if ema.get("dir") is not None else f"{folder}"
    try:
        snapshots = read_snapshots(folder)
    except Exception as err:  # noqa: BLE001 - a file torch cannot read: say which
        raise ConfigError(
            f"ema.sigma_rel={sigma_rel}: a snapshot in {where} cannot be read ({err}). Remove "
            "the damaged snapshot_<step>.pt (the others still reconstruct the EMA) and retry."
        ) from None
    if not snapshots:
        state = "has no snapshot_<step>.pt files" if folder.is_dir() else "does not exist"
        raise ConfigError(
            f"ema.sigma_rel={sigma_rel} needs the run's post-hoc EMA snapshots, but {where} "
            f"{state}. Train the run with callbacks=posthoc_ema (it writes "
            "<run>/posthoc_ema/snapshot_<step>.pt), pass ema.dir=<the snapshot folder>, or "
            "set ema.sigma_rel=null to evaluate the checkpoint's weights."
        )
    x, error, t = plan_reconstruction(snapshots, float(sigma_rel))
    stored = sorted({round(g, 12) for s in snapshots for g in s.gammas})
    from diffexp.training.posthoc_ema import gamma_to_sigma_rel

    stored_sigma = ", ".join(f"{gamma_to_sigma_rel(g):.3g}" for g in stored)
    if error > float(max_error):
        raise ConfigError(
            f"ema.sigma_rel={sigma_rel}: the {len(snapshots)} snapshots in {where} (steps "
            f"{snapshots[0].step}..{snapshots[-1].step}, sigma_rel {stored_sigma}) reconstruct "
            f"its profile only to a relative L2 error of {error:.3g} > ema.max_error="
            f"{max_error}. Choose an ema.sigma_rel nearer the stored ones (values between them "
            "reconstruct best), snapshot more often (callbacks.posthoc_ema.every_n_steps), or "
            "accept a larger error (ema.max_error)."
        )
    report = {
        "sigma_rel": float(sigma_rel),
        "gamma": sigma_rel_to_gamma(float(sigma_rel)),
        "step": max(s.step for s in snapshots if s.t == t),
        "t": t,
        "n_snapshots": len(snapshots),
        "stored_sigma_rels": [gamma_to_sigma_rel(g) for g in stored],
        "profile_error": error,
        "dir": str(folder),
    }
    return PostHocPlan(snapshots, x, report)


def apply_posthoc_ema(denoiser: nn.Module, plan: PostHocPlan) -> dict[str, Any]:
    """Replace ``denoiser``'s weights by the reconstruction of ``plan``; returns its report.
    The snapshots must hold every tensor of the denoiser (tied tensors once)."""
    import torch

    from diffexp.training.posthoc_ema import reconstruct

    weights = reconstruct(plan.snapshots, plan.coefficients)
    targets = denoiser.state_dict(keep_vars=True)
    done: set[int] = set()
    missing = []
    for name, tensor in targets.items():
        if name in weights:
            if tuple(weights[name].shape) != tuple(tensor.shape):
                missing.append(f"{name} (shape {list(weights[name].shape)})")
                continue
            with torch.no_grad():
                tensor.data.copy_(weights[name].to(tensor.dtype))
            done.add(id(tensor))
    missing += [n for n, t in targets.items() if n not in weights and id(t) not in done]
    unexpected = [n for n in weights if n not in targets]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ConfigError(
            f"ema.sigma_rel={plan.report['sigma_rel']}: the snapshots in {plan.report['dir']} do "
            f"not fit the run's denoiser ({len(missing)} of its tensors missing or of another "
            f"shape, {len(unexpected)} unknown; e.g. {first}): they were written by another "
            "run. Pass ema.dir=<this run's posthoc_ema folder>, or set ema.sigma_rel=null."
        )
    from diffexp.training.loggers import log

    r = plan.report
    log.info(
        "post-hoc EMA sigma_rel=%s (gamma %.3f) at step %d from %d snapshots in %s: profile "
        "error %.2e",
        r["sigma_rel"],
        r["gamma"],
        r["step"],
        r["n_snapshots"],
        r["dir"],
        r["profile_error"],
    )
    return r


# ---------------------------------------------------------------------- guidance and labels
def guided_denoiser(model: LoadedModel, cfg: DictConfig) -> DenoiserLike:
    """The model wrapped by the configured guidance (``guidance=...``; none: as it is), with the
    classifier of classifier guidance loaded here."""
    from diffexp.build.factory import build_guidance

    spec = build_guidance(cfg, model.datamodule)
    if spec.conditional_network and not getattr(model.denoiser.network, "num_classes", 0):
        where = f"the model of {model.source}" if model.source != "oracle" else "this model"
        raise ConfigError(
            f"guidance=cfg needs a model trained with classifier-free guidance (a conditional "
            f"network); {where} is unconditional. Train with guidance=cfg, or use "
            "guidance=classifier (classifier guidance of an unconditional model), or drop "
            "guidance=cfg."
        )
    classifier = (
        load_classifier(spec.classifier, model.datamodule, cfg) if spec.needs_classifier else None
    )
    return spec.wrap(model.denoiser, classifier)


def load_classifier(option: str | None, datamodule: Any, cfg: DictConfig) -> nn.Module:
    """The noisy classifier of ``guidance.classifier``: the mixture's exact one (``oracle``), or
    a checkpoint of ``python -m diffexp.train_classifier`` (a file or its run folder)."""
    check_classifier_option(option)
    if option == "oracle":
        mixture = getattr(datamodule, "mixture", None)
        if mixture is None:
            from diffexp.build.factory import mixture_data_options

            raise ConfigError(
                "guidance.classifier=oracle needs a Gaussian-mixture data set "
                f"({', '.join(mixture_data_options(cfg))}); train a classifier with "
                f"`{TRAIN_CLASSIFIER}` and pass guidance.classifier=<its checkpoints/last.ckpt>"
            )
        from diffexp.networks.oracle import OracleClassifier

        return OracleClassifier(mixture)
    from diffexp.training.classifier_module import load_noisy_classifier

    return load_noisy_classifier(str(option))


def sampling_labels(
    cfg: DictConfig, model: LoadedModel, denoiser: nn.Module, n: int, device: str
) -> Tensor | None:
    """Labels to sample from ``denoiser`` (the model as ``guided_denoiser`` wrapped it):
    ``label=k`` for all, ``labels=[...]`` cycled, else every class cycled; None for an
    unconditional, unguided model."""
    import torch

    num_classes = getattr(model.datamodule, "num_classes", 0)
    conditional = bool(getattr(model.denoiser.network, "num_classes", 0))
    from diffexp.diffusion.guidance import GuidedDenoiser

    guided = isinstance(denoiser, GuidedDenoiser)
    chosen = chosen_labels(cfg)
    asked = f"label={cfg.label}" if cfg.get("label") is not None else f"labels={_show(cfg.labels)}"
    if chosen is not None and not (conditional or guided):
        raise ConfigError(
            f"{asked} asks for samples of chosen classes, but {_model_name(model)} is "
            "unconditional (its network takes no label) and guidance=none: every sample would "
            "be stored with that label whatever its class. Add guidance=classifier (classifier "
            "guidance steers an unconditional model; guidance.classifier=oracle for a Gaussian "
            "mixture), use a model trained with guidance=cfg, or drop the label."
        )
    if chosen is None and not (conditional or guided):
        return None
    if not num_classes:
        raise ConfigError(
            f"{asked if chosen is not None else 'guidance'} needs labelled data, but "
            f"{type(model.datamodule).__name__} has no labels; use a labelled data set or drop it."
        )
    if chosen is None:
        chosen = list(range(num_classes))
    bad = [k for k in chosen if not 0 <= int(k) < num_classes]
    if bad:
        raise ConfigError(
            f"{asked}: {', '.join(str(k) for k in bad)} "
            f"{'is not a class' if len(bad) == 1 else 'are not classes'} of this data: expected "
            f"classes 0..{num_classes - 1}, e.g. label=0."
        )
    return torch.tensor(chosen, dtype=torch.long, device=device)[torch.arange(n) % len(chosen)]


def _model_name(model: LoadedModel) -> str:
    return "the oracle" if model.source == "oracle" else f"the model of {model.source}"


def describe_guidance(denoiser: nn.Module, base: nn.Module) -> str:
    """A one-line name of the guidance wrapped around ``base`` ("none" when unwrapped)."""
    if denoiser is base:
        return "none"
    interval = getattr(denoiser, "interval", None)
    shown = f"scale={getattr(denoiser, 'scale', None)}"
    if interval is not None:
        shown += f", interval={list(interval)}"
    return f"{type(denoiser).__name__}({shown})"
