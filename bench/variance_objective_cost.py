"""Cost of VDM's variance objective: a training step with schedule=learned_min_variance
against one with schedule=learned (the same model, the interior trained on the loss).

The variance objective rescales the interior's per-example gradient inside the loss's own
backward pass (factors 2 L_i), so it should cost nothing measurable; an earlier version that
took a second ``autograd.grad`` pass ran at 0.71 of the speed. Rounds alternate and the medians
are compared in the same run.

    python -m bench.variance_objective_cost [--steps 1000] [--rounds 3] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from bench.train_throughput import _config, framework_steps_per_second


def main() -> None:
    """Alternate rounds of both schedules' training steps; print steps/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    speeds: dict[str, list[float]] = {"learned": [], "learned_min_variance": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, runs in speeds.items():
                cfg = _config([f"schedule={name}", *overrides], tmp)
                runs.append(framework_steps_per_second(cfg, args.steps, args.warmup, tmp))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f} steps/s" for k, v in speeds.items()),
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"\n| schedule | steps/s (median of {args.rounds}) |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print(
        f"ratio learned_min_variance / learned: {med['learned_min_variance'] / med['learned']:.3f}"
    )


if __name__ == "__main__":
    main()
