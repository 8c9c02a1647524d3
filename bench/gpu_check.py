"""A short GPU check (about 4 minutes on an H200): precision, compile, memory and 1-GPU DDP.

On one CUDA device (or the CPU with ``--device cpu``):

1. training throughput (images/s) of the CIFAR UNet (``network=unet``, about 38M parameters) on
   CIFAR-shaped synthetic images (``bench.image_throughput.SyntheticCIFAR10``) through the
   framework's training step (Lightning ``Trainer.fit``, CSV logging every 50 steps, no
   validation or checkpoints), in ``32-true`` and ``bf16-mixed`` precision;
2. the speed-up of ``model.compile=true`` (``torch.compile`` of the network) in ``bf16-mixed``
   (``--compile-all``: in ``32-true`` too); the first steps, compile included, are timed apart;
3. the peak memory of each (``torch.cuda.max_memory_allocated``; on the CPU the process's peak
   resident set so far, which only grows);
4. a 1-GPU DDP run (``trainer=ddp trainer.devices=1``) against the single-process run: both
   ``python -m diffexp.train`` on the default ring for ``--ddp-steps`` steps, their final
   validation ELBO (``val/elbo_nats`` of summary.json) and its difference in standard errors;
5. with ``--plain``: the same 32-true training in a plain loop (``bench.train_throughput``'s:
   loss, backward, Adam, LR schedule, EMA, no Lightning) on the device, and framework / plain;
6. with ``--profile N``: ``torch.profiler`` over N eager bf16-mixed framework steps, the device's
   busy time against the wall clock and the operators with the most device time (written to
   ``profile_bf16.txt`` beside ``--out``).

Each number is printed when measured and the JSON of ``--out`` is rewritten after each. With
``--device cpu --tiny`` everything is small (a narrow UNet on 16x16 images, a few steps, 20 DDP
steps) and compile is skipped unless ``--compile`` is given: a test of the script, not a
measurement.

    python -m bench.gpu_check [--device cuda] [--out outputs/gpu_check/gpu_check.json] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from bench.image_throughput import cifar_overrides
from bench.train_throughput import _batches, _config, plain_setup, plain_step
from diffexp.build.factory import build_datamodule, build_module

ROOT = Path(__file__).resolve().parents[1]


class _WindowTimer(pl.Callback):
    """Wall-clock marks at the first step, after ``warmup`` steps and at the end (synchronizing
    the device first, so queued kernels count where they ran)."""

    def __init__(self, warmup: int, device: str) -> None:
        """Marks unset (NaN) until the run reaches them."""
        self.warmup, self.device = warmup, device
        self.first = self.start = self.end = math.nan

    def _now(self) -> float:
        """perf_counter after the device's queued work is done."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Mark the first step and the end of the warm-up."""
        if trainer.global_step == 0:
            self.first = self._now()
        if trainer.global_step == self.warmup:
            self.start = self._now()

    def on_train_end(self, trainer, pl_module):
        """Mark the end of the timed steps."""
        self.end = self._now()


class _Profile(_WindowTimer):
    """The window timer, with ``torch.profiler`` recording the timed steps."""

    def __init__(self, warmup: int, device: str) -> None:
        """No profiler until the warm-up ends."""
        super().__init__(warmup, device)
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Start the profiler with the timed steps."""
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_end(self, trainer, pl_module):
        """Stop the profiler after the last step (the device's queue drained)."""
        super().on_train_end(trainer, pl_module)
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def peak_memory_mb(device: str) -> float:
    """Peak memory in MiB: CUDA's max allocated since the last reset, or the process's max RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_memory(device: str) -> None:
    """Free what the last run left and restart the peak-memory count."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def throughput(
    overrides: list[str],
    precision: str,
    compile_net: bool,
    args: argparse.Namespace,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Images/s, ms/step, warm-up seconds and peak memory of ``Trainer.fit`` on the CIFAR UNet
    (with ``profile_steps``: that many timed steps, profiled; the profiler under ``profiler``)."""
    _reset_memory(args.device)
    steps, warmup = (profile_steps or args.steps), args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(
            [
                *overrides,
                f"trainer.max_steps={steps + warmup}",
                f"model.compile={str(compile_net).lower()}",
            ],
            tmp,
        )
        pl.seed_everything(0, verbose=False)
        dm = build_datamodule(cfg.data)
        module = build_module(cfg, dm)
        timer = (_Profile if profile_steps else _WindowTimer)(warmup, args.device)
        trainer = pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision=precision,
            max_steps=steps + warmup,
            logger=CSVLogger(tmp, name="gpu_check"),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=50,
            inference_mode=False,
        )
        trainer.fit(module, datamodule=dm)
        batch = int(cfg.data.batch_size)
    seconds = timer.end - timer.start
    result = {
        "images_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "warmup_s": timer.start - timer.first,
        "peak_mem_mb": peak_memory_mb(args.device),
        "batch": batch,
        "steps": steps,
    }
    if profile_steps:
        result["profiler"] = timer.profiler
    del trainer, module, dm
    return result


def plain_throughput(overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Images/s and ms/step of the plain 32-true loop (``bench.train_throughput.plain_chunks``'s
    step: the batch moved to the device, loss, backward, Adam, LR schedule, EMA)."""
    _reset_memory(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config([*overrides, f"trainer.max_steps={args.steps + args.warmup}"], tmp)
        dm, module, optimizer, scheduler = plain_setup(cfg, args.device)
        timer = _WindowTimer(args.warmup, args.device)
        for step, (x0, y) in enumerate(_batches(dm, args.steps + args.warmup)):
            if step == args.warmup:
                timer.start = timer._now()
            x0 = x0.to(args.device, non_blocking=True)
            y = None if y is None else y.to(args.device, non_blocking=True)
            plain_step(module, optimizer, scheduler, x0, y)
        timer.end = timer._now()
        batch = int(cfg.data.batch_size)
    seconds = timer.end - timer.start
    return {
        "images_per_s": batch * args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "peak_mem_mb": peak_memory_mb(args.device),
        "batch": batch,
        "steps": args.steps,
    }


def profile_report(profiler: torch.profiler.profile, wall_s: float, rows: int = 30) -> tuple:
    """(device busy seconds, host seconds in operators, the table of the top operators by self
    device time) of a finished profile."""
    events = profiler.key_averages()

    def device_us(e: Any) -> float:
        """An operator's self time on the device in us (the attribute's name moved in torch 2.4)."""
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, name):
                return float(getattr(e, name))
        return 0.0

    busy = sum(device_us(e) for e in events) / 1e6
    host = sum(float(e.self_cpu_time_total) for e in events) / 1e6
    sort = "self_cuda_time_total" if busy > 0 else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=rows)
    except (AttributeError, KeyError, ValueError):
        table = events.table(sort_by="self_device_time_total", row_limit=rows)
    header = (
        f"wall {wall_s:.3f} s, device busy {busy:.3f} s ({100 * busy / wall_s:.1f} %), "
        f"host in operators {host:.3f} s\n"
    )
    return busy, host, header + table


def train_run(extra: list[str], run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``python -m diffexp.train`` on the default ring for ``--ddp-steps`` steps with ``extra``;
    its summary.json's ELBO, wall time and fit time (or the error's tail)."""
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    cmd = [
        sys.executable,
        "-m",
        "diffexp.train",
        f"trainer.max_steps={args.ddp_steps}",
        f"trainer.accelerator={accelerator}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    if args.tiny:
        cmd += ["callbacks.samples.n=256", "sampler.steps=50"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (proc.stdout[-1000:] + proc.stderr[-3000:]), "wall_s": wall}
    summary = json.loads((run_dir / "summary.json").read_text())
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    return {
        "elbo_nats": summary["val/elbo_nats"],
        "elbo_se": summary.get("val/elbo_nats_se", math.nan),
        "wall_s": wall,
        "fit_s": timing.get("fit_time_s", math.nan),
        "command": " ".join(cmd[1:]),
    }


def ddp_check(args: argparse.Namespace) -> dict[str, Any]:
    """The single-process and the 1-device DDP run, their ELBOs and the difference."""
    with tempfile.TemporaryDirectory() as tmp:
        single = train_run([], Path(tmp) / "single", args)
        print(f"single process: {single.get('elbo_nats', single.get('error'))}", flush=True)
        ddp = train_run(["trainer=ddp", "trainer.devices=1"], Path(tmp) / "ddp", args)
        print(f"DDP, 1 device: {ddp.get('elbo_nats', ddp.get('error'))}", flush=True)
    out: dict[str, Any] = {"steps": args.ddp_steps, "single": single, "ddp": ddp}
    if "error" not in single and "error" not in ddp:
        diff = ddp["elbo_nats"] - single["elbo_nats"]
        se = math.hypot(single["elbo_se"], ddp["elbo_se"])
        out["diff_nats"] = diff
        out["diff_in_se"] = diff / se if se > 0 else math.nan
    return out


def environment(device: str) -> dict[str, Any]:
    """The device's name and the versions the numbers were measured with."""
    env: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def write(results: dict[str, Any], path: Path) -> None:
    """Rewrite the results JSON (after every measurement: a run cut short keeps what it got)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --tiny sizes and the device's defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check/gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a test of the script")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10)")
    parser.add_argument("--ddp-steps", type=int, default=None, help="default 500 (tiny: 20)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time model.compile=true (default: on a GPU, not on the CPU)",
    )
    parser.add_argument("--compile-all", action="store_true", help="compile in 32-true too")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument(
        "--plain", action="store_true", help="time the plain 32-true loop: framework / plain"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N eager bf16 steps"
    )
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default=None,
        help="torch.set_float32_matmul_precision (default: torch's, highest: no TF32)",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu (with --tiny for a quick test)")
    sizes = (4, 3, 2, 20) if args.tiny else (128, 40, 10, 500)
    for name, value in zip(("batch", "steps", "warmup", "ddp_steps"), sizes, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.compile is None:
        args.compile = args.device == "cuda"
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the checks in order (fast first, compile last), printing and saving each number."""
    args = parse_args(argv)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    overrides = cifar_overrides(args.batch, n_train=16 * args.batch, tiny=args.tiny)
    if args.tiny:
        overrides.append("+data.image_size=16")
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "settings": {
            "overrides": overrides,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "tiny": args.tiny,
        },
        "throughput": {},
    }
    print(f"environment: {results['environment']}", flush=True)
    runs = [("fp32", "32-true", False), ("bf16", "bf16-mixed", False)]
    compiled = [("bf16_compile", "bf16-mixed", True)] if args.compile else []
    if args.compile and args.compile_all:
        compiled.insert(0, ("fp32_compile", "32-true", True))
    failed = False

    def measure(name: str, precision: str, compile_net: bool) -> None:
        """One throughput run, printed and saved (an error is saved in its place)."""
        nonlocal failed
        start = time.perf_counter()
        try:
            got = throughput(overrides, precision, compile_net, args)
        except Exception as err:  # noqa: BLE001 - report and go on to the other checks
            failed = True
            got = {"error": f"{type(err).__name__}: {err}"}
        got["wall_s"] = time.perf_counter() - start
        results["throughput"][name] = got
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in got.items()
        )
        print(f"throughput {name} ({precision}, compile={compile_net}): {shown}", flush=True)
        write(results, args.out)

    for name, precision, compile_net in runs:
        measure(name, precision, compile_net)
    tp = results["throughput"]
    if "images_per_s" in tp["fp32"] and "images_per_s" in tp["bf16"]:
        results["bf16_speedup"] = tp["bf16"]["images_per_s"] / tp["fp32"]["images_per_s"]
        print(f"bf16-mixed / 32-true images/s: {results['bf16_speedup']:.3f}", flush=True)
    write(results, args.out)
    if args.plain:
        try:
            results["plain_fp32"] = plain_throughput(overrides, args)
        except Exception as err:  # noqa: BLE001 - report and go on to the other checks
            failed = True
            results["plain_fp32"] = {"error": f"{type(err).__name__}: {err}"}
        plain = results["plain_fp32"]
        print(f"plain loop (32-true): {plain}", flush=True)
        if "images_per_s" in plain and "images_per_s" in tp["fp32"]:
            results["framework_over_plain_fp32"] = (
                tp["fp32"]["images_per_s"] / plain["images_per_s"]
            )
            print(f"framework / plain (32-true): {results['framework_over_plain_fp32']:.3f}")
        write(results, args.out)
    if args.profile:
        try:
            got = throughput(overrides, "bf16-mixed", False, args, profile_steps=args.profile)
            busy, host, table = profile_report(
                got.pop("profiler"), got["ms_per_step"] * got["steps"] / 1000
            )
            (args.out.parent / "profile_bf16.txt").write_text(table)
            got.update(device_busy_s=busy, host_op_s=host)
            print(table, flush=True)
        except Exception as err:  # noqa: BLE001 - report and go on to the other checks
            failed = True
            got = {"error": f"{type(err).__name__}: {err}"}
        results["profile_bf16"] = got
        write(results, args.out)
    if not args.skip_ddp:
        start = time.perf_counter()
        results["ddp"] = ddp_check(args)
        results["ddp"]["wall_s"] = time.perf_counter() - start
        failed |= "diff_nats" not in results["ddp"]
        if "diff_nats" in results["ddp"]:
            d = results["ddp"]
            print(
                f"DDP (1 device) - single ELBO: {d['diff_nats']:+.4f} nats "
                f"({d['diff_in_se']:+.2f} SE)",
                flush=True,
            )
        write(results, args.out)
    for name, precision, compile_net in compiled:
        measure(name, precision, compile_net)
        eager = tp["bf16" if precision == "bf16-mixed" else "fp32"]
        if "images_per_s" in tp[name] and "images_per_s" in eager:
            key = "compile_speedup" if name == "bf16_compile" else "compile_speedup_fp32"
            results[key] = tp[name]["images_per_s"] / eager["images_per_s"]
            print(f"{name} / eager images/s: {results[key]:.3f}", flush=True)
        write(results, args.out)
    print(f"results written to {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
