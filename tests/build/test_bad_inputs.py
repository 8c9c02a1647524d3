"""Bad input on the command line is refused: exit code 2, one paragraph naming the key, no Python
traceback, before any compute, and nothing lost (the run folder and its checkpoints unchanged).

One parametrized test runs every row of ``CASES`` as ``python -m diffexp.<entry> <args>`` in a
subprocess. A row's ``args`` builds the argument list from ``Runs``, the module-scoped fixture:
one tiny trained ring8 run and broken checkpoints made from it. To add a case (train, compare,
...), append a ``Case`` to ``CASES``. Unit tests of the messages of ``runs`` and of the
checkpoint writer's full-disk path follow the table.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_RING_RUN

# outputs a command writes only once it computes something
COMPUTED = ("metrics.json", "samples.npz", "*.ckpt", "summary.json")


@dataclass(frozen=True)
class Runs:
    """What the cases point at: ``run`` (a trained ring8 run, unconditional), broken checkpoints
    made from its last.ckpt, folders that are not runs, and ``out`` for each case's output."""

    root: Path

    @property
    def run(self) -> Path:
        return self.root / "ring_run"

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"

    @property
    def bad(self) -> Path:
        return self.root / "bad"

    @property
    def no_ckpt_run(self) -> Path:
        return self.root / "run_without_checkpoints"

    @property
    def empty_last_run(self) -> Path:
        return self.root / "run_with_an_empty_last_ckpt"

    @property
    def no_data(self) -> Path:
        return self.root / "no_data"

    def out(self, case: str) -> Path:
        return self.root / "out" / case


@dataclass(frozen=True)
class Case:
    """One bad input: ``python -m diffexp.<entry> <args(runs)>`` must exit with ``code`` and name
    ``key`` in its message; ``no_compute``: no metrics, samples or checkpoints are written."""

    id: str
    entry: str
    args: Callable[[Runs], list[str]]
    key: str
    code: int = 2
    no_compute: bool = True
    # False for Hydra's own refusals (an unknown option): its message, not an ``error:`` line
    own_message: bool = True
    # False for entry points without Hydra (compare): no hydra.run.dir is appended
    hydra: bool = True


def _run(*args: str) -> Callable[[Runs], list[str]]:
    return lambda r: [f"run={r.run}", *args]


def _ckpt(name: str, *args: str) -> Callable[[Runs], list[str]]:
    return lambda r: [f"ckpt={r.bad / name}", *args]


def _plain(*args: str) -> Callable[[Runs], list[str]]:
    return lambda r: list(args)


CASES: list[Case] = [
    # 1. classifier-free guidance of an unconditional model: refused once loaded, before the ELBO
    Case("eval_cfg_unconditional", "eval", _run("guidance=cfg"), "guidance=cfg"),
    # 2. a split that does not exist
    Case("eval_split_foo", "eval", _plain("split=foo"), "split='foo'"),
    # a learned schedule has no fixed shape to compare the ELBO under (the options: conf/schedule)
    Case(
        "eval_estimators_learned_schedule",
        "eval",
        _plain("estimators.schedules=[own,learned]"),
        "estimators.schedules='learned'",
    ),
    # 3. overrides of what the checkpoint defines (they would be ignored)
    Case("eval_data_override", "eval", _run("data=grid25"), "data=grid25"),
    Case(
        "eval_schedule_override_ckpt",
        "eval",
        lambda r: [f"ckpt={r.ckpt}", "schedule=cosine"],
        "schedule=cosine",
    ),
    Case("sample_model_T_override", "sample", _run("model.T=10"), "model.T=10"),
    Case("sample_network_width_added", "sample", _run("+network.width=64"), "network.width"),
    # 4. a label for an unconditional, unguided model
    Case("sample_label_unconditional", "sample", _run("label=3"), "label=3"),
    # 5. values out of range
    Case("eval_n_t_0", "eval", _plain("n_t=0"), "n_t=0"),
    Case("eval_max_elements_negative", "eval", _plain("max_elements=-1"), "max_elements=-1"),
    Case("sample_n_samples_negative", "sample", _plain("n_samples=-5"), "n_samples=-5"),
    Case("eval_sampler_steps_0", "eval", _plain("sampler.steps=0"), "sampler.steps=0"),
    Case("eval_run_sampler_steps_0", "eval", _run("sampler.steps=0"), "sampler.steps=0"),
    # 6. classifier guidance without a classifier
    Case(
        "eval_classifier_null",
        "eval",
        _plain("guidance=classifier", "guidance.classifier=null"),
        "guidance.classifier",
    ),
    Case(
        "sample_classifier_missing_file",
        "sample",
        lambda r: ["guidance=classifier", f"guidance.classifier={r.root / 'nope.ckpt'}"],
        "guidance.classifier",
    ),
    # 7. weights that do not fit the network the stored config builds
    Case("eval_width_mismatch", "eval", _ckpt("width.ckpt"), "differ in shape"),
    # 8. a folder as ckpt=
    Case("eval_ckpt_is_a_directory", "eval", lambda r: [f"ckpt={r.run}"], "is a directory"),
    # 9. files that are not checkpoints
    Case("eval_ckpt_empty", "eval", _ckpt("empty.ckpt"), "empty"),
    Case("eval_ckpt_garbage", "eval", _ckpt("garbage.ckpt"), "not a torch checkpoint"),
    Case("sample_ckpt_truncated", "sample", _ckpt("truncated.ckpt"), "truncated"),
    Case("eval_ckpt_missing", "eval", _ckpt("nope.ckpt"), "does not exist"),
    # 10. run folders that are not there or hold no checkpoint
    Case("eval_run_missing", "eval", lambda r: [f"run={r.root / 'nope'}"], "does not exist"),
    Case(
        "sample_run_without_checkpoints",
        "sample",
        lambda r: [f"run={r.no_ckpt_run}"],
        "no checkpoints/last.ckpt",
    ),
    Case(
        "eval_run_with_an_empty_last_ckpt",
        "eval",
        lambda r: [f"run={r.empty_last_run}"],
        "step_000001.ckpt",  # the message names the other checkpoints
    ),
    # 11. image data: the absent files first; an MLP on images named as such
    Case(
        "train_mnist_files_missing",
        "train",
        lambda r: ["data=mnist", f"paths.data_dir={r.no_data}", "logger=csv"],
        "data.data_dir",
    ),
    Case(
        "train_digits_mlp",
        "train",
        _plain("data=digits", "network=mlp", "logger=csv"),
        "network=mlp",
    ),
    # train: values of the wrong type or out of range, refused from the config alone
    Case("train_sampler_steps_0", "train", _plain("sampler.steps=0"), "sampler.steps=0"),
    Case("train_reconstruction_unknown", "train", _plain("model.reconstruction=vdm"), "'vdm'"),
    Case(
        "train_adaptive_target_unknown",
        "train",
        _plain("noise_sampling=adaptive", "noise_sampling.target=var"),
        "noise_sampling.target='var'",
    ),
    Case(
        "train_adaptive_discrete",
        "train",
        _plain("noise_sampling=adaptive", "model.T=10"),
        "model.T=10",
    ),
    # a setting the sampler's class refuses, checked by building the sampler before any compute
    Case("train_pc_snr_negative", "train", _plain("sampler=pc", "sampler.snr=-1"), "snr > 0"),
    Case(
        "sample_ode_solver_unknown",
        "sample",
        _plain("network=oracle", "sampler=ode", "sampler.solver=bogus"),
        "unknown ODE solver 'bogus'",
    ),
    Case("train_model_T_negative", "train", _plain("model.T=-1"), "model.T=-1"),
    Case("train_ema_decay_above_1", "train", _plain("model.ema_decay=1.5"), "model.ema_decay=1.5"),
    Case("train_max_steps_text", "train", _plain("trainer.max_steps=abc"), "trainer.max_steps"),
    Case("train_max_steps_0", "train", _plain("trainer.max_steps=0"), "trainer.max_steps=0"),
    Case("train_seed_text", "train", _plain("seed=abc"), "seed='abc'"),
    Case("train_lr_negative", "train", _plain("model.optimizer.lr=-1"), "model.optimizer.lr"),
    Case("train_batch_size_0", "train", _plain("data.batch_size=0"), "data.batch_size=0"),
    Case("train_elbo_n_t_0", "train", _plain("callbacks.elbo.n_t=0"), "callbacks.elbo.n_t=0"),
    Case(
        "train_elbo_max_elements_text",
        "train",
        _plain("callbacks.elbo.max_elements=lots"),
        "callbacks.elbo.max_elements='lots'",
    ),
    Case(
        "train_val_interval_0",
        "train",
        _plain("trainer.check_val_every_n_epoch=0"),
        "trainer.check_val_every_n_epoch=0",
    ),
    Case(
        "train_checkpoint_interval_0",
        "train",
        _plain("callbacks.last_checkpoint.every_n_train_steps=0"),
        "callbacks.last_checkpoint.every_n_train_steps=0",
    ),
    Case(
        "train_unknown_option",
        "train",
        _plain("parameterization=noise"),
        "parameterization",
        own_message=False,
    ),
    # train: resuming with a config that defines another model or objective
    Case(
        "train_resume_schedule_changed",
        "train",
        lambda r: [f"ckpt_path={r.ckpt}", "schedule=cosine"],
        "schedule._target_",
    ),
    Case(
        "train_resume_parameterization_changed",
        "train",
        lambda r: [f"ckpt_path={r.ckpt}", "parameterization=x0"],
        "parameterization._target_",
    ),
    # train: checkpoints that cannot be resumed
    Case("train_ckpt_path_directory", "train", lambda r: [f"ckpt_path={r.run}"], "is a directory"),
    Case(
        "train_ckpt_path_missing",
        "train",
        lambda r: [f"ckpt_path={r.root / 'nope.ckpt'}"],
        "does not exist",
    ),
    Case(
        "train_ckpt_path_garbage",
        "train",
        lambda r: [f"ckpt_path={r.bad / 'garbage.ckpt'}"],
        "not a readable checkpoint",
    ),
    Case(
        "train_ckpt_path_empty",
        "train",
        lambda r: [f"ckpt_path={r.bad / 'empty.ckpt'}"],
        "the file is empty",
    ),
    # compare: paths that hold no runs, an unknown grouping
    Case(
        "compare_missing_path",
        "compare",
        lambda r: [str(r.root / "nope")],
        "nope",
        hydra=False,
    ),
    Case("compare_no_runs", "compare", lambda r: [str(r.no_data)], "no_data", hydra=False),
    Case(
        "compare_unknown_group_by",
        "compare",
        lambda r: [str(r.run), "--group-by", "colour", "--out", str(r.out("compare"))],
        "--group-by",
        hydra=False,
    ),
    # our own
    Case("sample_steps_0", "sample", _plain("steps=0"), "steps=0"),
    Case("eval_batch_size_0", "eval", _plain("batch_size=0"), "batch_size=0"),
    Case(
        "eval_labels_not_classes",
        "eval",
        _run("guidance=classifier", "labels=[99]"),
        "labels=[99]",
    ),
    Case("eval_labels_not_integers", "eval", _plain("labels=[a,1]"), "labels=[a,1]"),
    Case("sample_label_and_labels", "sample", _plain("label=1", "labels=[2]"), "label=1"),
    Case("sample_run_and_ckpt", "sample", lambda r: [f"run={r.run}", f"ckpt={r.ckpt}"], "run="),
    Case(
        "sample_guidance_scale_text",
        "sample",
        _plain("guidance=cfg", "guidance.scale=abc"),
        "guidance.scale",
    ),
    Case("eval_device_unknown", "eval", _plain("device=gpu0"), "device"),
    # an optimized time grid: fitted after training, to a model, for a sampler and steps
    Case(
        "train_optimized_grid",
        "train",
        _plain("sampler.time_grid=optimized"),
        "sampler.time_grid=optimized is for eval and sample",
    ),
    Case(
        "sample_optimized_grid_oracle_without_grid",
        "sample",
        _plain("sampler.time_grid=optimized"),
        "grid=<the file",
    ),
    Case(
        "sample_optimized_grid_not_fitted",
        "sample",
        _run("sampler=sde", "steps=7", "sampler.time_grid=optimized"),
        "grids/ReverseSDE-7.json",
    ),
    Case(
        "optimize_grid_of_an_optimized_grid",
        "optimize_grid",
        _plain("sampler.time_grid=optimized"),
        "sampler.time_grid=optimized",
    ),
    Case(
        "optimize_grid_adaptive_solver",
        "optimize_grid",
        _plain("sampler=ode", "sampler.solver=dopri5"),
        "sampler.solver=dopri5",
    ),
    Case("optimize_grid_no_rhos", "optimize_grid", _plain("search.rhos=[]"), "search.rhos"),
    Case("optimize_grid_n_samples_1", "optimize_grid", _plain("n_samples=1"), "n_samples=1"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)  # conftest sets it; the refusal is what a user sees
    return env


def _python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` except the cases' outputs: size and mtime."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "out"
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """One tiny trained run (ring8, unconditional) and broken checkpoints made from it."""
    import torch

    r = Runs(tmp_path_factory.mktemp("bad_inputs"))
    proc = _python(
        [
            "diffexp.train",
            *TINY_RING_RUN,
            "trainer.check_val_every_n_epoch=1",
            f"hydra.run.dir={r.run}",
        ]
    )
    assert proc.returncode == 0 and r.ckpt.is_file(), proc.stderr[-3000:]
    r.bad.mkdir()
    (r.bad / "empty.ckpt").write_bytes(b"")
    (r.bad / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    (r.bad / "truncated.ckpt").write_bytes(r.ckpt.read_bytes()[:4096])
    state = torch.load(r.ckpt, map_location="cpu", weights_only=True)
    state["diffexp_config"]["network"]["width"] = 64  # the weights are of width 128
    torch.save(state, r.bad / "width.ckpt")
    (r.no_ckpt_run / "checkpoints").mkdir(parents=True)
    (r.no_ckpt_run / ".hydra").mkdir()
    (r.empty_last_run / "checkpoints").mkdir(parents=True)
    (r.empty_last_run / "checkpoints" / "last.ckpt").write_bytes(b"")  # a write that never was
    shutil.copy(r.ckpt, r.empty_last_run / "checkpoints" / "step_000001.ckpt")
    r.no_data.mkdir()
    return r


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_clearly_before_compute(runs, case):
    before = _snapshot(runs.root)
    out = runs.out(case.id)
    start = time.monotonic()
    where = [f"hydra.run.dir={out}"] if case.hydra else []
    proc = _python([f"diffexp.{case.entry}", *case.args(runs), *where])
    seconds = time.monotonic() - start
    both = proc.stdout + proc.stderr
    assert proc.returncode == case.code, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    assert "weights_only" not in both
    assert case.key in proc.stderr, proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == (1 if case.own_message else 0), proc.stderr  # one paragraph
    if case.no_compute:
        written = [p.name for pattern in COMPUTED for p in out.rglob(pattern)]
        assert not written, f"computed before refusing: {written}"
    assert _snapshot(runs.root) == before  # nothing lost, nothing touched
    assert seconds < 60, f"{case.id} took {seconds:.0f} s to refuse"


# ---------------------------------------------------------------------- runs: the messages
def test_a_run_folder_as_ckpt_lists_the_checkpoints_inside(tmp_path):
    from diffexp.build.runs import resolve_checkpoint
    from diffexp.cli import ConfigError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a directory") as err:
        resolve_checkpoint(None, str(tmp_path))
    assert f"run={tmp_path}" in str(err.value) and "last.ckpt" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), None)
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    (tmp_path / "checkpoints" / "step_000010.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="step_000010.ckpt"):
        resolve_checkpoint(str(tmp_path), None)


@pytest.mark.parametrize(
    "content,what",
    [
        (b"", "empty"),
        (b"not a checkpoint at all" * 10, "not a torch checkpoint"),
        (b"PK\x03\x04" + b"\0" * 100, "truncated"),
    ],
)
def test_unreadable_checkpoints_get_our_message_not_torchs(tmp_path, content, what):
    from diffexp.cli import ConfigError
    from diffexp.training.checkpoint_io import load_checkpoint

    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert what in message and str(path) in message and f"{len(content)} bytes" in message
    assert "weights_only" not in message


def test_overrides_equal_to_the_stored_config_and_defaults_are_not_refused():
    from omegaconf import OmegaConf

    from diffexp.build.runs import checkpoint_overrides

    cfg = OmegaConf.create(
        {"seed": 3, "data": {"_target_": "D", "preset": "ring8", "seed": "${seed}"}, "n_t": 4}
    )
    stored = OmegaConf.create({"data": {"_target_": "D", "preset": "ring8", "seed": 0}})
    # the data's seed is interpolated from the run's own: not the option's
    assert checkpoint_overrides(cfg, stored, ["data=ring8", "n_t=4", "seed=3"]) == []
    assert checkpoint_overrides(cfg, stored, []) == []  # defaults are not overrides
    other = OmegaConf.create({"data": {"_target_": "D", "preset": "grid25", "seed": 0}})
    (problem,) = checkpoint_overrides(cfg, other, ["data=ring8"])
    assert "data.preset" in problem and "grid25" in problem


# ---------------------------------------------------------------------- a full disk
@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed "
            "writing file data/3: file write failed, unexpected pos 1234"
        ),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch_unexpected_pos", "enospc"],
)
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, failure):
    import torch

    from diffexp.training import checkpoint_io
    from diffexp.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "diffexp_config": {}}, path)
    good = (path.read_bytes(), path.stat().st_mtime_ns)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise failure

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "diffexp_config": {}}, path)
    message = str(err.value)
    assert "the disk is full" in message and str(path) in message and "free" in message
    assert "unchanged" in message and "ckpt_path=" in message
    assert err.value.errno == errno.ENOSPC
    assert (path.read_bytes(), path.stat().st_mtime_ns) == good
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_first_write_leaves_no_file(tmp_path, monkeypatch):
    import torch

    from diffexp.training import checkpoint_io
    from diffexp.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    def broken(obj, f, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint_io.torch, "save", broken)
    with pytest.raises(CheckpointWriteError, match="the write failed") as err:
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "c" / "last.ckpt")
    assert "No checkpoint was written" in str(err.value)
    assert list((tmp_path / "c").iterdir()) == []
    assert shutil.disk_usage(tmp_path).free > 0


def test_a_full_disk_during_training_exits_1_with_the_reason_and_no_partial_file(tmp_path):
    """A file-size limit (``ulimit -f``: writes past it fail as on a full disk) stops the first
    checkpoint write: exit 1, the message, no traceback, no partial checkpoint left behind."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "diffexp.train",
        "data.n_train=2048",
        "trainer.max_steps=8",
        "logger=csv",
        "callbacks.elbo.n_t=2",
        "callbacks.samples.every_n_epochs=0",
        f"hydra.run.dir={run}",
    ]
    command = "ulimit -f 400 && exec " + " ".join(args)  # 400 KiB: logs fit, a checkpoint not
    proc = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: cannot write checkpoint" in proc.stderr and "last.ckpt" in proc.stderr
    assert not list((run / "checkpoints").glob("*"))  # no partial file, no temporary file
