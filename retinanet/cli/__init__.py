"""The `retinanet` command line: `retinanet <command> [options]` (also `python -m retinanet` and
`python tools/<command>.py`, which call the same code).

Each command is a module of this package with a usage docstring, `add_arguments(parser)` and
`run(args) -> exit status`; `run_command` gives them all the same error handling, exit codes and
distributed shutdown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# command name -> module under retinanet.cli (imported only when the command runs)
COMMANDS: dict[str, str] = {
    "quickstart": "quickstart",
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "convert": "convert",
    "analyze-loss": "analyze_loss",
    "calibrate": "calibrate",
    "ablate": "ablate",
    "benchmark": "benchmark",
    "gpu-selftest": "gpu_selftest",
    "check-dataset": "check_dataset",
    "convert-dataset": "convert_dataset",
    "analyze-anchors": "analyze_anchors",
    "export": "export",
}

# What a user can cause (a bad config, file, dataset, checkpoint or device) ends in one line;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError, KeyError)
DEBUG_ENV = "RETINANET_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """`retinanet <command> ...`: returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from retinanet import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    return run_command(name, rest)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse `argv` for command `name` and run it. Errors a user can cause print `error: ...`
    and return 1; an interrupted training returns its signal's exit code (128 + signal);
    the process group, if any, is always shut down."""
    from retinanet.engine.distributed import failures_shared, shutdown_distributed
    from retinanet.engine.signals import TrainingInterrupted

    module = importlib.import_module(f"retinanet.cli.{COMMANDS[name]}")
    parser = argparse.ArgumentParser(
        prog=f"retinanet {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    # Under torchrun a failing process tells the others (which then stop naming it), instead of
    # leaving them waiting in a collective until it times out.
    run = failures_shared(module.run, clean_stops=(TrainingInterrupted,))
    try:
        return int(run(args))
    except TrainingInterrupted as stopped:
        print(str(stopped), file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            raise
        # KeyError's str() is the repr of its key; its message is the first argument.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


def _overview() -> str:
    lines = ["usage: retinanet <command> [options]   (retinanet <command> -h for its options)", ""]
    lines += [f"  {name}" for name in COMMANDS]
    lines += ["", f"Set {DEBUG_ENV}=1 to see the traceback of an error."]
    return "\n".join(lines)
