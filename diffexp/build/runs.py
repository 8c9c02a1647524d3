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
    state = load_checkpoint(path, key=key)
    train_cfg = OmegaConf.create(state["diffexp_config"])
    refuse_checkpoint_overrides(cfg, train_cfg, overrides, source)
    from diffexp.build.factory import build_datamodule, build_module  # the training stack: seconds

    _seed(seed)
    datamodule = build_datamodule(train_cfg.data, require_files=need_data)
    module = build_module(train_cfg, datamodule)
    load_weights(module, state["state_dict"], checkpoint_name(path, key), train_cfg)
    denoiser = module.eval_denoiser if cfg.get("use_ema", True) else module.denoiser
    denoiser.eval()
    return LoadedModel(denoiser.to(device), datamodule, module.T, str(path), train_cfg)


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
    return f"{type(denoiser).__name__}(scale={getattr(denoiser, 'scale', None)})"
