"""Milliseconds per training step through the command line, start-up cancelled.

Each command runs as a whole process for ``--short`` and ``--long`` steps; the difference of the
wall times over the difference of the steps is the cost of a step, with the start-up (imports,
data, the final validation and sample plot) cancelled:

- diffexp: ``python -m diffexp.train trainer.max_steps=N``, the default run as a user types it,
  in-loop validation (the ELBO every 10 epochs), checkpoints (every 500 steps and every epoch),
  logging (every 50 steps) and the progress bar included;
- diffexp, steps only: the same with ``trainer.check_val_every_n_epoch=100000`` (no in-loop
  validation, hence no in-loop sample plot; checkpoints and logging as configured);
- minimal: ``python -m bench.minimal_loop --steps N``, the hand-written loop of the same
  mathematics.

The rounds alternate between the commands; each command's time at each step count is the fastest
of its rounds (interruptions by other work on this shared machine only add time).

    python -m bench.step_time [--short 500] [--long 3000] [--rounds 3] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    walls: dict[str, dict[int, list[float]]] = {
        n: {args.short: [], args.long: []} for n in COMMANDS
    }
    for r in range(args.rounds):
        for name, command in COMMANDS.items():
            for steps in (args.short, args.long):
                with tempfile.TemporaryDirectory() as tmp:
                    walls[name][steps].append(wall_seconds(command, steps, overrides, tmp))
            print(
                f"round {r + 1}: {name}: {walls[name][args.short][-1]:.2f} s for {args.short} "
                f"steps, {walls[name][args.long][-1]:.2f} s for {args.long}",
                flush=True,
            )
    # the fastest of the rounds at each length: interruptions by other work only add time
    ms = {
        name: 1000 * (min(w[args.long]) - min(w[args.short])) / (args.long - args.short)
        for name, w in walls.items()
    }
    minimal = ms["minimal hand-written loop"]
    print()
    print(
        f"(min wall at {args.long} steps - min wall at {args.short} steps) / "
        f"{args.long - args.short}, {args.rounds} rounds; overrides: "
        f"{' '.join(overrides) or 'none'}"
    )
    print("| command | ms/step | minimal / this |")
    print("|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {minimal / value:.3f} |")


if __name__ == "__main__":
    main()
