"""Soak test: a long quick-scale `ctmeta train` loop; resident memory must stay flat.

Runs `ctmeta.runs.train` (the loop `ctmeta train` uses: sampling, jitted
meta-step, metrics.csv rows, checkpoints every --checkpoint-every) on
CosMixture with A-MAML and few inner states, for thousands of
meta-iterations, and samples the process's resident set size (RSS) at each
log line. The first sample after warm-up (compilation, first checkpoint) is
the baseline; the script prints the baseline, the end value and the growth,
and exits 1 if the growth exceeds --max-growth-mb.

    python scripts/soak.py --meta-iterations 3000 --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def rss_mb() -> float:
    """Resident memory of this process in MiB (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="cosmixture")
    p.add_argument("--method", default="amaml")
    p.add_argument("--meta-iterations", type=int, default=3000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--T", type=float, default=None,
                   help="horizon (default: steps x 0.01, the step h = 0.01 at which A-MAML's sweep is stable)")
    p.add_argument("--meta-batch", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--warmup", type=int, default=200, help="iterations before the baseline sample")
    p.add_argument("--max-growth-mb", type=float, default=50.0)
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = p.parse_args(argv)

    from ctmeta.presets import build, resolve_config
    from ctmeta.runs import Reporter, RunDir, train

    config = resolve_config(
        args.benchmark, args.method, steps=args.steps, T=args.T if args.T is not None else 0.01 * args.steps,
        meta_iterations=args.meta_iterations,
        meta_batch=args.meta_batch, checkpoint_every=args.checkpoint_every,
    )
    samples: list[tuple[int, float, float]] = []  # (iteration, seconds, rss MiB)
    t0 = time.perf_counter()

    class SoakReporter(Reporter):
        def log(self, message: str) -> None:
            super().log(message)
            if message.startswith("[iter"):
                it = int(message[len("[iter"):].split("/")[0])
                samples.append((it, time.perf_counter() - t0, rss_mb()))
                print(f"    rss {samples[-1][2]:.1f} MiB at iteration {it}", flush=True)

    exp = build(config, progress=False)
    reporter = SoakReporter(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(args.out or os.path.join(tmp, "soak-run"), config)
        print(f"soak: {config['benchmark']}/{config['method']} steps {config['steps']} meta-batch "
              f"{config['meta_batch']}, {args.meta_iterations} meta-iterations, checkpoint every "
              f"{args.checkpoint_every}; rss at start (before JAX work) {rss_mb():.1f} MiB", flush=True)
        # Warm-up: compile and run a few hundred iterations, then take the baseline.
        warm = min(args.warmup, args.meta_iterations)
        exp.config["meta_iterations"] = warm
        state = train(exp, run, reporter=reporter)
        base = rss_mb()
        t_base = time.perf_counter()
        print(f"soak: baseline after {warm} warm-up iterations: rss {base:.1f} MiB", flush=True)
        exp.config["meta_iterations"] = args.meta_iterations
        state = train(exp, run, state=state, reporter=reporter)
        end = rss_mb()
        n = int(state.iteration) - warm
        rate = n / max(time.perf_counter() - t_base, 1e-9)
        rows = len(run.read_metrics())
    growth = end - base
    print(f"soak: iterations {warm}..{int(state.iteration)} ({n} measured, {rate:.1f} it/s), metrics rows {rows}")
    print(f"soak: rss start {base:.1f} MiB, end {end:.1f} MiB, growth {growth:+.1f} MiB "
          f"({1024 * growth / max(n, 1):+.2f} KiB per iteration)")
    after = [s for s in samples if s[0] > warm]
    if after:
        print("soak: rss samples (iteration: MiB): " + ", ".join(f"{i}: {m:.1f}" for i, _, m in after))
    if growth > args.max_growth_mb:
        print(f"soak: FAIL: resident memory grew by {growth:.1f} MiB > {args.max_growth_mb} MiB", file=sys.stderr)
        return 1
    print("soak: OK: resident memory flat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
