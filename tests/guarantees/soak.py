"""The soak command: many seeded runs, a summary, and a shrunk schedule per failure.

    python -m tests.guarantees --backend directory|redis|both --runs N --seed S --seconds T

Seeds S, S+1, ... (default: a random start, printed). Each failing run prints
its seed, its violations and its schedule; `--shrink` then searches for the
shortest schedule that still fails. Exit status 1 when anything failed.
Re-run one seed with `--runs 1 --seed S`; keep its logs with `--keep`. A shrunk
schedule is printed as JSON too: re-run it with `--schedule FILE` (that JSON).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from .driver import redis_available, run
from .schedule import Schedule, generate
from .shrink import shrink


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guarantees", description=__doc__)
    parser.add_argument("--backend", choices=["directory", "redis", "both"], default="directory")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=3.0, help="ops phase per run")
    parser.add_argument("--shrink", action="store_true", help="shrink each failing schedule")
    parser.add_argument("--budget", type=int, default=30, help="runs per shrink")
    parser.add_argument("--keep", action="store_true", help="keep each run's logs")
    parser.add_argument("--schedule", help="a file holding a schedule's JSON: run it instead")
    parser.add_argument("-q", "--quiet", action="store_true", help="only failures and the summary")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    backends = ["directory", "redis"] if args.backend == "both" else [args.backend]
    if "redis" in backends and (why := redis_available()) is not None:
        print(f"redis runs skipped: {why}")
        backends.remove("redis")
    print(f"seeds {seed}..{seed + args.runs - 1} on {', '.join(backends) or 'nothing'}")
    totals: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failed: list[str] = []
    began = time.monotonic()
    for i in range(args.runs):
        for backend in backends:
            if args.schedule:
                with open(args.schedule) as f:
                    schedule = Schedule.from_json(f.read())
                if schedule.backend != backend:
                    continue
            else:
                schedule = generate(seed + i, backend, args.seconds)
            outcome = run(schedule, keep=args.keep)
            h = outcome.history
            totals["runs"] += 1
            totals["processes"] += len(schedule.agents)
            totals["operations"] += sum(
                h.count(ev) for ev in ("send", "set", "del", "lock_wait", "memo_call", "ro_call")
            )
            totals["messages acknowledged"] += sum(
                len(r["qs"]) for r in h.records if r["ev"] == "ack"
            )
            totals["deliveries"] += h.count("recv")
            totals["adds"] += h.count("add_ret")
            totals["add winners"] += sum(1 for r in h.records if r["ev"] == "add_ret" and r["won"])
            totals["increments"] += h.count("incr_ret")
            totals["versioned writes"] += h.count("cas_ret")
            totals["versioned refusals"] += sum(
                r["tries"] - 1 for r in h.records if r["ev"] == "cas_ret"
            )
            totals["faults"] += len(schedule.events)
            totals["violations"] += len(outcome.violations)
            for v in outcome.violations:
                kinds[v.kind] += 1
            if outcome.failed:
                failed.append(f"{schedule.seed}/{backend}")
                print(outcome.report(), flush=True)
                if outcome.logdir is not None:
                    print(f"  logs: {outcome.logdir}")
                if args.shrink:
                    found = {v.kind for v in outcome.violations}
                    smallest, spent = shrink(schedule, found, budget=args.budget)
                    print(f"shortest schedule still failing ({spent} runs to find):")
                    print(smallest.describe())
                    print(f"as JSON (for --schedule): {smallest.to_json()}", flush=True)
            elif not args.quiet:
                print(
                    f"seed {schedule.seed} ({backend}): ok, {len(schedule.agents)} processes, "
                    f"{len(schedule.events)} events, {outcome.seconds:.1f} s",
                    flush=True,
                )
    print(
        f"summary: {totals['runs']} runs, {totals['processes']} processes, "
        f"{totals['operations']} operations ({totals['messages acknowledged']} messages "
        f"acknowledged, {totals['deliveries']} deliveries), {totals['faults']} faults and "
        f"coordinated events; {totals['adds']} adds ({totals['add winners']} won), "
        f"{totals['increments']} increments, {totals['versioned writes']} versioned writes "
        f"({totals['versioned refusals']} refusals retried); {totals['violations']} violations "
        f"({', '.join(f'{k}: {n}' for k, n in kinds.most_common()) or 'none'}) "
        f"in {time.monotonic() - began:.0f} s"
    )
    if failed:
        print(f"failing seeds: {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
