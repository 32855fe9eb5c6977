"""The ``kt-bench`` command line: the top-level parser, ``--version``, the dispatch to the
command's own module and the one-line errors.

Each command lives in a module of its own, imported only when that command is chosen: the
commands that read a results folder (``report``, ``status``) and ``--help``/``--version``
start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

import kt_bench
from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.interrupts import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    sigterm_as_interrupt,
)

#: Each command: the module with its arguments (``add_parser``) and its code (``run``), and
#: its line in ``kt-bench --help`` (kept here, so that the help imports no command module).
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("kt_bench.commands.listing", "list methods, models, datasets or grids"),
    "run": ("kt_bench.commands.run", "run a grid of cells and print the comparison table"),
    "bench": ("kt_bench.commands.bench", "training images/s: plain loop vs engine vs cohort"),
    "downstream": ("kt_bench.commands.downstream",
                   "linear probes and detection fine-tuning of a run folder's students"),
    "status": ("kt_bench.commands.status", "done, running and failed cells of a run folder"),
    "report": ("kt_bench.commands.report", "write tables and plots of a run folder"),
    "teachers": ("kt_bench.commands.teachers",
                 "fetch and verify the published CIFAR-100 teachers (for --teachers-dir)"),
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (imported on first use)."""
    return importlib.import_module(COMMANDS[name][0])


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser of ``kt-bench``, with the arguments of ``commands`` (default: all of
    them); every other command is there by name and help line only."""
    parser = argparse.ArgumentParser(
        prog="kt-bench", description="Benchmark knowledge-transfer methods for image classifiers.")
    parser.add_argument("--version", action="version", version=f"kt-bench {kt_bench.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    full = set(commands)
    for name, (_, help_line) in COMMANDS.items():
        if name in full:
            command_module(name).add_parser(sub, help_line)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def chosen_command(argv: Sequence[str]) -> list[str]:
    """The command ``argv`` names (its first word that is no option; the top-level options
    take no value), as a list: empty when it names none that exists."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return [first] if first in COMMANDS else []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kt-bench`` console script: 0 done, 1 a cell or the report did not
    finish, 2 an error (one line on stderr), 130 interrupted (Ctrl-C), 143 terminated
    (SIGTERM; in ``run``, which stops as on Ctrl-C, keeping what is done)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    try:
        return _dispatch(args)
    except KtBenchError as exc:
        print(f"kt-bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file kt-bench could not read or write, with the system's reason
        print(f"kt-bench: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        rerun = ": rerun the same command to resume" if args.command == "run" else ""
        print(f"kt-bench: {how}{rerun}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; ``run`` takes SIGTERM as an interrupt while it runs."""
    run = command_module(args.command).run
    if args.command != "run":
        return run(args)
    with sigterm_as_interrupt():
        return run(args)


def os_error_line(exc: OSError) -> str:
    """``exc`` as one line naming its file(s) and the system's reason."""
    if exc.filename is None:
        return first_line(exc)
    files = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{files}: {exc.strerror or first_line(exc)}"


if __name__ == "__main__":
    sys.exit(main())
