"""Run benchmark commands one after another in this process, each as its script's ``main(argv)``.

``gpu_suite.sh --dry-run`` feeds it the toy version of every stage's command, one per line
(``python3 benchmarks/<script>.py ARGS``, shell-quoted), so that torch, transformers and TRL are
imported once instead of once per command. Exits 1 when a command raised (its traceback printed).

Usage: python -m benchmarks.dry_run < commands.txt
"""
from __future__ import annotations

import importlib
import shlex
import sys
import time
import traceback


def run_command(line: str) -> bool:
    """Run one ``python3 benchmarks/<script>.py ARGS`` line in this process; True when it did not raise."""
    words = shlex.split(line)
    script = next(w for w in words if w.endswith(".py"))
    argv = words[words.index(script) + 1:]
    module = importlib.import_module("benchmarks." + script.rsplit("/", 1)[-1][:-len(".py")])
    saved, sys.argv = sys.argv, [script, *argv]
    started = time.time()
    try:
        module.main(argv)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported, and the next command still runs
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return True
        traceback.print_exc()
        print(f"[dry run] FAILED after {time.time() - started:.0f} s: {line}", flush=True)
        return False
    finally:
        sys.argv = saved
    print(f"[dry run] ok in {time.time() - started:.1f} s: {script}", flush=True)
    return True


def main() -> int:
    results = [run_command(line) for line in sys.stdin.read().splitlines() if line.strip()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
