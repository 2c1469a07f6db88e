"""Runs pytest while busy processes hold the CPU cores: `python -m tests.helpers.under_load [PYTEST ARGS]`.

CI machines are shared, so a test must not depend on how fast the machine is. This puts the
tests under the load a neighbour would: one process spinning per core (`--hogs N`, default every
core this process may use), for as long as pytest runs. The hogs are killed whatever happens, and
each also stops by itself once this runner is gone (SIGKILLed, say), so none is left behind."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

# Spins until its parent (this runner) is gone: checking getppid() every few million additions
# keeps it busy without leaving it behind.
HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(2_000_000))\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.helpers.under_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)),
                   help="busy processes to run beside pytest (default: one per usable core)")
    args, pytest_args = p.parse_known_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    print(f"under_load: {len(hogs)} busy processes (pids {', '.join(str(h.pid) for h in hogs)}) "
          f"beside pytest {' '.join(pytest_args)}", flush=True)
    try:
        return subprocess.call([sys.executable, "-m", "pytest", *pytest_args])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    sys.exit(main())
