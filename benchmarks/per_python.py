"""The message-path targets on each supported Python: `python -m benchmarks.per_python`.

For each of Python 3.11, 3.12 and 3.13 found (`python3.X` on PATH if it runs,
else pyenv's copy; or those given with `--versions`), makes or reuses a venv under
/tmp/ivip-bench-venvs/ (re-installing `.[bench]` when pyproject.toml changed), then
runs, with that interpreter from this checkout, only the scenarios those
targets read (`latency throughput many_to_one redis_backend budget`, lean: no
watchfiles/inotify/orjson rows) and saves
`benchmarks/results/<time>-py3.X.json`. The main page's "Per Python version" table
reads the newest such file of each version (`sections`). About 4 minutes per version
with 3 repeats on 2 cores.

    python -m benchmarks.per_python                     # every version present
    python -m benchmarks.per_python --versions 3.12 3.13 --repeat 3
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from . import budget as b
from .harness import RESULTS, ROOT, Aggregated, aggregate
from .report import Sections, fmt
from .targets import get, message_path

VERSIONS = ("3.11", "3.12", "3.13")
SCENARIOS = ("latency", "throughput", "many_to_one", "redis_backend", "budget")
VENVS = "/tmp/ivip-bench-venvs"
COMMAND = "python -m benchmarks.per_python"


def find_python(version: str) -> str | None:
    """An interpreter of `version`: `python3.X` on PATH if it runs (a pyenv shim may
    be on PATH without that version selected), else pyenv's own copy."""
    candidates = [shutil.which(f"python{version}")]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}*", "bin", "python3")))
    for path in candidates:
        if path and subprocess.run([path, "-c", ""], capture_output=True).returncode == 0:
            return path
    return None


def _pyproject_hash() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def venv_for(version: str, base: str, interpreter: str) -> str:
    """The venv's python for `version`, made or refreshed as needed."""
    venv = os.path.join(base, f"py{version}")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".ivip-bench-installed")
    want = _pyproject_hash()
    if not os.path.exists(python):
        subprocess.run([interpreter, "-m", "venv", venv], check=True)
    installed = ""
    if os.path.exists(stamp):
        with open(stamp) as f:
            installed = f.read()
    if installed != want:
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True, cwd=ROOT
        )
        with open(stamp, "w") as f:
            f.write(want)
    return python


def run_one(version: str, interpreter: str, base: str, repeat: int, quick: bool) -> str:
    """Run the message-path scenarios with one interpreter; the path of its results file."""
    python = venv_for(version, base, interpreter)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(RESULTS, f"{stamp}-py{version}.json")
    page = os.path.join(base, f"page-py{version}", "benchmarks.md")
    os.makedirs(os.path.dirname(page), exist_ok=True)
    cmd = [python, "-m", "benchmarks", "--only", *SCENARIOS, "--repeat", str(repeat)]
    cmd += ["--lean", "--out", page, "--results", out] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def newest(version: str) -> str | None:
    files = sorted(glob.glob(os.path.join(RESULTS, f"*-py{version}.json")))
    return files[-1] if files else None


TITLE = "Per Python version"


def sections(results: Aggregated | None = None, repeats: int = 0) -> Sections:
    """The page's "Per Python version" table: each message-path target per version,
    from the newest saved per-Python file of each version."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for version in VERSIONS:
        path = newest(version)
        if path is None:
            continue
        try:
            with open(path) as f:
                found[version] = (path, json.load(f))
        except (OSError, ValueError):
            continue
    lines = [
        f"The message-path targets on each supported Python, from `{COMMAND}` (a venv per "
        "interpreter under /tmp/ivip-bench-venvs, this checkout, the scenarios "
        f"`{' '.join(SCENARIOS)}` without the rows no message-path target reads, 3 repeats, "
        "medians); each column is the newest `benchmarks/results/*-py3.X.json` of its "
        "version, a separate run from the tables above.",
        "",
    ]
    aggregated = {v: aggregate(saved["raw"]) for v, (_, saved) in found.items()}
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here not in aggregated and results and "throughput" in results:
        aggregated[here] = results  # this run stands in for its own version
    if not aggregated:
        return {TITLE: [*lines, f"No per-Python results saved yet: run `{COMMAND}`.", ""]}
    aggregated = {v: aggregated[v] for v in VERSIONS if v in aggregated}
    per_version = {v: message_path(a) for v, a in aggregated.items()}
    columns = list(per_version)
    lines += [
        "| target | " + " | ".join(f"Python {v}" for v in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    names = [t.name for t in next(iter(per_version.values()))]
    for i, name in enumerate(names):
        cells = []
        for v in columns:
            t = per_version[v][i]
            mark = "n/a" if t.met is None else ("met" if t.met else "**not met**")
            cells.append(f"{t.short} {mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, stage in (
        ("budget: awaited `notify`, ns", b.SENDER_WHOLE),
        ("budget: receiver CPU per message, ns", b.RECEIVER_WHOLE),
    ):
        cells = [fmt(get(a, "budget", stage, b.METRIC)) for a in aggregated.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for v, (path, saved) in found.items():
        quick = " (--quick)" if "--quick" in saved.get("command", "") else ""
        python = saved.get("python", v)
        lines.append(
            f"- Python {python}: `benchmarks/results/{os.path.basename(path)}`{quick}, "
            f"`{saved.get('command', '?')}`"
        )
    if here in aggregated and here not in found:
        lines.append(f"- Python {here}: this run (no `*-py{here}.json` saved)")
    missing = [v for v in VERSIONS if v not in aggregated]
    if missing:
        lines.append(f"- not measured: Python {', '.join(missing)}")
    return {TITLE: [*lines, ""]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--venvs", default=VENVS, help="where the venvs live")
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    started = time.monotonic()
    for version in args.versions:
        interpreter = find_python(version)
        if interpreter is None:
            print(f"python{version}: not found (PATH, pyenv), skipped")
            continue
        t0 = time.monotonic()
        print(f"== Python {version}: {interpreter}", flush=True)
        path = run_one(version, interpreter, args.venvs, args.repeat, args.quick)
        print(f"saved {os.path.relpath(path, ROOT)} in {time.monotonic() - t0:.0f}s", flush=True)
    print(f"all in {time.monotonic() - started:.0f}s\n")
    print("\n".join(sections()[TITLE]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
