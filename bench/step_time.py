"""Milliseconds per training step through the command line, start-up cancelled.

Each command runs as a whole process for ``--short`` and ``--long`` steps; the difference of the
wall times over the difference of the steps is the cost of a step, with the start-up (imports,
data, the final validation and sample plot) cancelled:

- diffexp: ``python -m diffexp.train trainer.max_steps=N``, the default run as a user types it,
  in-loop validation (the ELBO every 10 epochs), sample plots and checkpoints included;
- diffexp, steps only: the same with ``trainer.check_val_every_n_epoch=100000`` (no in-loop
  validation, hence no in-loop sample plot; checkpoints and logging as configured);
- minimal: ``python -m bench.minimal_loop --steps N``, the hand-written loop of the same
  mathematics.

    python -m bench.step_time [--short 500] [--long 3000] [--rounds 1] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "diffexp (default run)": ["-m", "diffexp.train"],
    "diffexp, steps only (no in-loop validation)": [
        "-m",
        "diffexp.train",
        "trainer.check_val_every_n_epoch=100000",
    ],
    "minimal hand-written loop": ["-m", "bench.minimal_loop"],
}


def wall_seconds(args: list[str], steps: int, overrides: list[str], out_dir: str) -> float:
    """The wall time of one process running ``steps`` training steps."""
    if args[1] == "bench.minimal_loop":
        cmd = [sys.executable, *args, "--steps", str(steps), *overrides]
    else:
        cmd = [
            sys.executable,
            *args,
            f"trainer.max_steps={steps}",
            f"paths.output_dir={out_dir}",
            "trainer.enable_progress_bar=false",
            *overrides,
        ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Time every command at both step counts, print ms/step and the ratios to the minimal loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=500)
    parser.add_argument("--long", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    args, overrides = parser.parse_known_args()
    ms: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for r in range(args.rounds):
        for name, command in COMMANDS.items():
            with tempfile.TemporaryDirectory() as tmp:
                short = wall_seconds(command, args.short, overrides, f"{tmp}/short")
                long = wall_seconds(command, args.long, overrides, f"{tmp}/long")
            ms[name].append(1000 * (long - short) / (args.long - args.short))
            print(f"round {r + 1}: {name}: {ms[name][-1]:.2f} ms/step", flush=True)
    minimal = statistics.median(ms["minimal hand-written loop"])
    print()
    print(
        f"({args.long} steps - {args.short} steps) / {args.long - args.short}, median of "
        f"{args.rounds}; overrides: {' '.join(overrides) or 'none'}"
    )
    print("| command | ms/step | minimal / this |")
    print("|---|---|---|")
    for name, values in ms.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.2f} | {minimal / m:.3f} |")


if __name__ == "__main__":
    main()
