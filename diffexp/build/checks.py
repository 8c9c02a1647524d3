"""Checks of a composed config before any compute: a value of the wrong type or out of range is
refused with the key, the value, the valid range and the fix (``ConfigError``).

Only what the config alone decides is checked here: the rules in milliseconds; a sampler's own
settings by building it (a plain dataclass, but its module imports torch) and the estimators'
schedule names from conf/schedule. What needs the data or a checkpoint (shapes, labels, a stored
config) is checked where those are loaded, still before training, evaluation or sampling starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffexp.cli import CONF_DIR, ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """``key`` must be ``kind`` (int, float, choice) within [low, high] (or one of ``allowed``)."""

    key: str
    kind: str  # "int" | "float" | "choice" | "bool"
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    allowed: tuple[Any, ...] = ()
    nullable: bool = False
    fix: str = ""

    def expected(self) -> str:
        """The valid values in words."""
        if self.kind == "choice":
            text = "one of " + ", ".join(str(a) for a in self.allowed)
        elif self.kind == "bool":
            text = "true or false"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.low is not None:
                bounds.append(f">= {_fmt(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_fmt(self.high)}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
            if self.kind != "choice" and self.allowed:
                text += " (or " + ", ".join(str(a) for a in self.allowed) + ")"
        return text + (" or null" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is valid, else the reason."""
        if value is None:
            return None if self.nullable else "must be set"
        if self.kind == "choice":
            return None if value in self.allowed else "is not a valid choice"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "is not true or false"
        if value in self.allowed and not isinstance(value, bool):
            return None
        number = _as_number(value, integer=self.kind == "int")
        if number is None:
            return f"is not {'an integer' if self.kind == 'int' else 'a number'}"
        if self.low is not None and number < self.low:
            return "is out of range"
        if self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        ):
            return "is out of range"
        return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _as_number(value: Any, integer: bool) -> float | None:
    """``value`` as a finite number (an int when ``integer``), else None; bools are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value) or (integer and not value.is_integer()):
            return None
        return value
    return None


def lookup(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key``; ``_ABSENT`` when the key or its group is not in the config."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key} cannot be read: {err}") from err
    return value


def interpolated(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` or one of its parents is an interpolation (``${...}``): its value is
    checked where it is defined, not once more here."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        if OmegaConf.is_interpolation(node, part):
            return True
        node = node._get_node(part)  # OmegaConf's only accessor that does not resolve
    return False


def check_rules(cfg: DictConfig, rules: Sequence[Rule]) -> None:
    """Refuse ``cfg`` when any rule fails: one paragraph naming every offending key."""
    problems = []
    for rule in rules:
        if interpolated(cfg, rule.key):
            continue
        value = lookup(cfg, rule.key)
        if value is _ABSENT:
            continue
        reason = rule.problem(value)
        if reason is not None:
            fix = f" {rule.fix}" if rule.fix else ""
            problems.append(f"{rule.key}={value!r} {reason}: expected {rule.expected()}.{fix}")
    if problems:
        raise ConfigError(" ".join(problems))


def _sampler_rules(prefix: str = "sampler") -> list[Rule]:
    return [
        Rule(f"{prefix}.steps", "int", low=1, fix=f"Set {prefix}.steps=50, for example."),
    ]


def _guidance_rules() -> list[Rule]:
    return [
        Rule(
            "guidance.scale",
            "float",
            fix="Set guidance.scale=3.0 (classifier-free) or 1.0 (classifier), for example.",
        ),
    ]


TRAIN_RULES: tuple[Rule, ...] = (
    Rule("seed", "int", low=0, fix="Set seed=0, for example."),
    Rule(
        "trainer.max_steps",
        "int",
        low=1,
        allowed=(-1,),
        fix="Set trainer.max_steps=6000 (the default), or -1 to stop after trainer.max_epochs.",
    ),
    Rule("trainer.max_epochs", "int", low=1, allowed=(-1,), nullable=True),
    Rule(
        "trainer.check_val_every_n_epoch",
        "int",
        low=1,
        nullable=True,
        fix="Set trainer.check_val_every_n_epoch=10 (the default).",
    ),
    Rule("trainer.log_every_n_steps", "int", low=1, fix="Set trainer.log_every_n_steps=50."),
    Rule("trainer.num_nodes", "int", low=1),
    Rule(
        "trainer.precision",
        "choice",
        allowed=("32-true", "32", 32, "bf16-mixed", "16-mixed", "64-true", "64", 64),
        fix="Use 32-true (the default), bf16-mixed (the network in bf16, the ELBO's math in "
        "float32) or 16-mixed (float16 with a gradient scaler); 64-true runs everything in "
        "float64. bf16-true and 16-true are refused: the ELBO's terms are differences of large "
        "numbers (SNR up to e^10) that 8 or 11 bits of mantissa cannot hold.",
    ),
    Rule(
        "model.T",
        "int",
        low=0,
        fix="Use model.T=0 for continuous time or model.T=1000 for a 1000-step model.",
    ),
    Rule(
        "model.ema_decay",
        "float",
        low=0.0,
        high=1.0,
        high_open=True,
        nullable=True,
        fix="Use model.ema_decay=0.999 (the default), or null (or 0) for no EMA.",
    ),
    Rule("model.schedule_lr", "float", low=0.0, nullable=True),
    Rule("model.compile", "bool", fix="Use model.compile=true to compile the network, or false."),
    Rule("model.optimizer.lr", "float", low=0.0, fix="Set model.optimizer.lr=2e-3 (the default)."),
    Rule("model.lr_scheduler.warmup_steps", "int", low=0),
    Rule("model.lr_scheduler.final_frac", "float", low=0.0, high=1.0),
    Rule("noise_sampling.bins", "int", low=1, fix="Set noise_sampling.bins=100 (the default)."),
    Rule(
        "noise_sampling.decay",
        "float",
        low=0.0,
        high=1.0,
        high_open=True,
        fix="Set noise_sampling.decay=0.99 (the default).",
    ),
    Rule(
        "noise_sampling.target",
        "choice",
        allowed=("mean", "rms"),
        fix="Use noise_sampling.target=mean (p proportional to the weighted loss) or rms (to its "
        "root mean square, the variance-optimal density).",
    ),
    Rule(
        "noise_sampling.uniform",
        "float",
        low=1e-3,
        high=1.0,
        fix="Set noise_sampling.uniform=0.1 (the default): the uniform share keeps w / p bounded.",
    ),
    Rule("data.n_train", "int", low=1),
    Rule("data.n_val", "int", low=1),
    Rule("data.n_test", "int", low=1),
    Rule("data.batch_size", "int", low=1, fix="Set data.batch_size=512, for example."),
    Rule("data.eval_batch_size", "int", low=1),
    Rule("callbacks.elbo.n_t", "int", low=1, fix="Set callbacks.elbo.n_t=64 (the default)."),
    Rule(
        "callbacks.elbo.max_elements",
        "int",
        low=0,
        nullable=True,
        fix="Set callbacks.elbo.max_elements=null (the device's default) or 0 (one network call "
        "per noise level).",
    ),
    Rule("callbacks.samples.n", "int", low=1),
    Rule("callbacks.samples.every_n_epochs", "int", low=0),
    Rule(
        "callbacks.last_checkpoint.every_n_train_steps",
        "int",
        low=1,
        nullable=True,
        fix="Set callbacks.last_checkpoint.every_n_train_steps=500 (the default), or null to "
        "write last.ckpt only at the end of each epoch.",
    ),
    Rule("callbacks.last_checkpoint.every_n_minutes", "float", low=0.0, nullable=True),
    *_sampler_rules(),
    *_sampler_rules("callbacks.samples.sampler"),
)

EVAL_RULES: tuple[Rule, ...] = (
    Rule("seed", "int", low=0, fix="Set seed=0, for example."),
    Rule(
        "split",
        "choice",
        allowed=("test", "val"),
        fix="Use split=test (the default) or split=val.",
    ),
    Rule("n_t", "int", low=1, fix="Set n_t=64 (the default)."),
    Rule(
        "max_elements",
        "int",
        low=0,
        nullable=True,
        fix="Set max_elements=null (the device's default) or 0 (one call per noise level).",
    ),
    Rule("n_samples", "int", low=0, fix="Set n_samples=5000 (the default), or 0 to skip them."),
    Rule("n_projections", "int", low=1),
    Rule("batch_size", "int", low=1, fix="Set batch_size=2000 (the default)."),
    Rule("steps", "int", low=1, nullable=True, fix="Set steps=50, or null for the sampler's own."),
    Rule("label", "int", low=0, nullable=True),
    Rule("use_ema", "bool"),
    Rule("exact_loop", "bool"),
    Rule("model.T", "int", low=0),
    Rule("ode_likelihood.n_examples", "int", low=0),
    Rule("ode_likelihood.rtol", "float", low=1e-12, fix="Set ode_likelihood.rtol=1e-5."),
    Rule("ode_likelihood.atol", "float", low=1e-12, fix="Set ode_likelihood.atol=1e-5."),
    Rule("estimators.n_repeats", "int", low=1),
    *_guidance_rules(),
    *_sampler_rules(),
)

SAMPLE_RULES: tuple[Rule, ...] = (
    Rule("seed", "int", low=0, fix="Set seed=0, for example."),
    Rule("n_samples", "int", low=1, fix="Set n_samples=5000 (the default)."),
    Rule("steps", "int", low=1, nullable=True, fix="Set steps=50, or null for the sampler's own."),
    Rule("label", "int", low=0, nullable=True),
    Rule("use_ema", "bool"),
    Rule("model.T", "int", low=0),
    *_guidance_rules(),
    *_sampler_rules(),
)

OPTIMIZE_GRID_RULES: tuple[Rule, ...] = (
    Rule("seed", "int", low=0, fix="Set seed=0, for example."),
    Rule("n_samples", "int", low=2, fix="Set n_samples=2000 (the default)."),
    Rule("reference_steps", "int", low=1, fix="Set reference_steps=200 (the default)."),
    Rule("steps", "int", low=1, nullable=True, fix="Set steps=10, for example."),
    Rule("search.sweeps", "int", low=0, fix="Set search.sweeps=3 (the default)."),
    Rule("label", "int", low=0, nullable=True),
    Rule("use_ema", "bool"),
    Rule("model.T", "int", low=0),
    *_guidance_rules(),
    *_sampler_rules(),
)


def check_no_optimized_grid(cfg: DictConfig, keys: Sequence[str], why: str) -> None:
    """Refuse ``time_grid=optimized`` for the samplers at ``keys`` (``why``: where it cannot be)."""
    for key in keys:
        if OmegaConf.select(cfg, f"{key}.time_grid") == "optimized":
            raise ConfigError(
                f"{key}.time_grid=optimized {why}. Choose a fixed grid ({key}.time_grid=log_snr, "
                "uniform or karras)."
            )


def check_samplers(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Refuse a sampler whose settings its class refuses (a plain dataclass: building it costs
    nothing), naming the key; before any model is built or trained."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    for key in keys:
        node = OmegaConf.select(cfg, key)
        if node is None:
            continue
        try:
            instantiate(node)
        except InstantiationException as err:
            reason = err.__cause__ or err
            raise ConfigError(
                f"{key}: {reason}. Fix the setting on the command line ({key}.<setting>=...)."
            ) from None


# the optimizer's parameter groups that model.grad_clip may clip (DiffusionModule's names)
GRAD_CLIP_GROUPS = ("network", "schedule")
GRAD_CLIP_FIX = (
    "Write model.grad_clip={network:1.0} (a maximum gradient norm per parameter group; groups: "
    "network, and schedule with a learned schedule), or model.grad_clip=null for no clipping."
)


def check_grad_clip(cfg: DictConfig) -> None:
    """``model.grad_clip``: null, or a mapping of parameter group to a positive max norm."""
    if interpolated(cfg, "model.grad_clip"):
        return
    value = lookup(cfg, "model.grad_clip")
    if value is _ABSENT or value is None:
        return
    if not isinstance(value, DictConfig):
        raise ConfigError(
            f"model.grad_clip={value!r} is not a mapping of parameter group to maximum norm "
            f"(each group is clipped alone). {GRAD_CLIP_FIX}"
        )
    for group, norm in value.items():
        if group not in GRAD_CLIP_GROUPS:
            raise ConfigError(
                f"model.grad_clip.{group}: no parameter group is called {group!r}. " + GRAD_CLIP_FIX
            )
        number = _as_number(norm, integer=False)
        if norm is not None and (number is None or number <= 0):
            raise ConfigError(
                f"model.grad_clip.{group}={norm!r} is not a maximum norm: expected a number > 0 "
                f"or null. {GRAD_CLIP_FIX}"
            )


def check_guidance_interval(cfg: DictConfig) -> None:
    """``guidance.interval``: null or [lambda_lo, lambda_hi], lambda_lo < lambda_hi."""
    from diffexp.build.guidance_specs import check_interval

    if interpolated(cfg, "guidance.interval"):
        return
    value = lookup(cfg, "guidance.interval")
    if value is not _ABSENT:
        check_interval(OmegaConf.to_object(value) if isinstance(value, ListConfig) else value)


def check_train(cfg: DictConfig) -> None:
    """Refuse a training config whose values are of the wrong type or out of range."""
    check_rules(cfg, TRAIN_RULES)
    check_grad_clip(cfg)
    check_guidance_interval(cfg)
    check_samplers(cfg, ["sampler", "callbacks.samples.sampler"])
    check_no_optimized_grid(
        cfg,
        ["sampler", "callbacks.samples.sampler"],
        "is for eval and sample: a grid is fitted to a trained model (python -m "
        "diffexp.optimize_grid run=<run> ...) after training",
    )


def check_eval(cfg: DictConfig) -> None:
    """Refuse an evaluation config whose values are of the wrong type or out of range."""
    check_rules(cfg, EVAL_RULES)
    check_guidance_interval(cfg)
    check_samplers(cfg, ["sampler"])
    names = OmegaConf.select(cfg, "estimators.schedules") or []
    if names:
        check_schedule_options(list(names), "estimators.schedules")


def check_optimize_grid(cfg: DictConfig) -> None:
    """Refuse a grid-fitting config whose values are of the wrong type or out of range."""
    check_rules(cfg, OPTIMIZE_GRID_RULES)
    check_guidance_interval(cfg)
    check_samplers(cfg, ["sampler"])
    check_no_optimized_grid(
        cfg,
        ["sampler"],
        "cannot be fitted: sampler.time_grid is the fixed grid of the reference run "
        "(reference_steps steps) and the grid the fit starts from",
    )
    from hydra.utils import instantiate

    if getattr(instantiate(cfg.sampler), "adaptive", False):
        raise ConfigError(
            f"sampler.solver={cfg.sampler.solver}: an adaptive solver chooses its own steps and "
            "uses no grid point but the ends, so there is no grid to fit. Use a fixed-step "
            "solver (sampler.solver=heun, euler, rk4, ...) or another sampler."
        )
    for key in ("search.fractions", "search.rhos"):
        values = OmegaConf.select(cfg, key)
        ok = isinstance(values, ListConfig) and len(values) > 0
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        low = 0.0 if key == "search.fractions" else 1e-3
        high = 0.45 if key == "search.fractions" else 100.0
        if not ok or not all(low <= float(v) <= high for v in values):
            raise ConfigError(
                f"{key}={values!r}: expected a non-empty list of numbers in [{low}, {high}]. "
                f"Set {key}=[...] (defaults: fractions [0.0, 0.1, 0.2, 0.3], rhos [0.5, 0.7, "
                "1.0, 1.4, 2.0])."
            )


def check_sample(cfg: DictConfig) -> None:
    """Refuse a sampling config whose values are of the wrong type or out of range."""
    check_rules(cfg, SAMPLE_RULES)
    check_guidance_interval(cfg)
    check_samplers(cfg, ["sampler"])


def fixed_schedule_options() -> list[str]:
    """The ``schedule=`` options of conf/schedule with fixed shapes (not learned): the schedules
    the ELBO estimators can compare at a model's endpoints."""
    from hydra.utils import get_class

    from diffexp.diffusion.schedules import Learned

    options = []
    for path in sorted(Path(CONF_DIR, "schedule").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target and not issubclass(get_class(target), Learned):
            options.append(path.stem)
    return options


def check_schedule_options(names: list[str], key: str) -> None:
    """Refuse names that are neither ``own`` nor a fixed schedule of conf/schedule."""
    valid = ["own", *fixed_schedule_options()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(
            f"{key}={bad[0]!r}: not a schedule to compare at the model's endpoints; "
            f"valid: {', '.join(valid)} (own: the model's; a learned schedule has no fixed shape)"
        )
