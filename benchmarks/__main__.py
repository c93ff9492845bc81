"""Run the benchmark suite: `python -m benchmarks [--quick] [--repeat N] [--only NAME ...]`.

Saves the raw results to benchmarks/results/<time>.json and prints the targets,
met or not, with their ratios. The page (docs/benchmarks.md and its plot) is
written only when asked: `--publish` writes the project's page, `--out PATH`
another one. Each measuring module also runs alone (`python -m benchmarks.MODULE`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .harness import aggregate, redis_available, run, save, sized
from .page import plot, targets_text, write_markdown
from .report import PAGE
from .suite import SCENARIOS


def progress_bar(started: float) -> Any:
    """A one-line progress bar, redrawn in place."""

    def show(done: int, total: int, what: str) -> None:
        filled = int(30 * done / max(1, total))
        bar = "#" * filled + "." * (30 - filled)
        elapsed = time.monotonic() - started
        end = "\n" if done == total else ""
        print(f"\r[{bar}] {done}/{total} {elapsed:5.0f}s  {what:<24}", end=end, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (~1 minute)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--codec", default="json", choices=["json", "orjson"])
    parser.add_argument("--out", help="write the page (and its plot) to this .md path")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write the project's page, docs/benchmarks.md (same as --out docs/benchmarks.md)",
    )
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="write the page again from a saved run (benchmarks/results/*.json), running nothing",
    )
    parser.add_argument(
        "--lean", action="store_true", help="only the rows the message-path targets read"
    )
    parser.add_argument("--results", help="where to save the raw results (a .json path)")
    args = parser.parse_args(argv)
    if args.publish:
        args.out = PAGE
    if args.render:
        if args.out is None:
            parser.error("--render writes a page: give --publish or --out PATH")
        with open(args.render) as f:
            saved = json.load(f)
        return _write(saved["raw"], args.out, saved["command"], saved.get("notes", []))
    names = args.only or list(SCENARIOS)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = []
    if args.quick:
        notes.append("--quick: smaller message counts than the workloads below describe.")
    if not redis_available():
        notes.append("No Redis server answered on 127.0.0.1:6379: Redis peers were skipped.")
    started = time.monotonic()
    scenarios = {name: SCENARIOS[name] for name in names}
    raw = run(scenarios, args.repeat, sized(args.quick, args.lean), args.codec,
              progress_bar(started))  # fmt: skip
    saved_to = save({"command": command.strip(), "raw": raw, "notes": notes}, args.results)
    print(f"saved {saved_to}")
    print(f"ran in {time.monotonic() - started:.0f}s")
    return _write(raw, args.out, command.strip(), notes)


def _write(raw: dict[str, list[Any]], out: str | None, command: str, notes: list[str]) -> int:
    """Aggregate the runs (medians), write the page and the plot if asked, print the
    targets."""
    aggregated = aggregate(raw)
    repeats = max(len(runs) for runs in raw.values())
    if out is None:
        print("page not written (--publish writes docs/benchmarks.md, --out PATH elsewhere)\n")
    else:
        image = plot(os.path.splitext(out)[0] + ".png", aggregated)
        write_markdown(out, aggregated, repeats, command, notes, image)
        print(f"wrote {out}\n")
    print(targets_text(aggregated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
