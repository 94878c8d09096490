"""``python -m bench.openloop``: run the open-loop scheduler scenarios (see the package docstring)."""

from bench import procs
from bench.openloop.cli import main

if __name__ == "__main__":
    raise SystemExit(procs.run_main("openloop", main))
