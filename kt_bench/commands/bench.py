"""``kt-bench bench``: training images/s of a plain loop, the engine solo and the cohort.

Imported only for this command (its defaults come from :mod:`kt_bench.bench.speed`, which
loads torch)."""

from __future__ import annotations

import argparse
import json

from kt_bench.api.method import build_method
from kt_bench.api.plugins import load_plugins
from kt_bench.bench.speed import DEMO_METHODS, BenchConfig, expand_methods, format_result, run_bench
from kt_bench.commands.common import add_plugins_arg
from kt_bench.core.errors import KtBenchError
from kt_bench.core.precision import resolve_precision
from kt_bench.training.device import check_device_and_precision


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``bench`` command, described by ``help``, to ``subparsers``."""
    p = subparsers.add_parser("bench", help=help)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help="comma-separated methods, 'all' for every registered one (default: "
                        "the 8 demo methods); an initialisation stage (AB, FT, FSP) is "
                        "skipped: methods are timed in their main stage")
    p.add_argument("--dataset", help="a uint8 image dataset (cifar10, cifar100) instead of "
                                     "random CIFAR-shaped data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (median)")
    p.add_argument("--workers", type=int, help="the plain loop's DataLoader workers "
                                               "(default: min(8, CPUs))")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="no,bf16",
                   help="the precisions to measure, comma-separated, each against its own "
                        "bare-model limit (default no,bf16: fp32 and bf16 autocast)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's networks (solo and cohort)")
    p.add_argument("--no-nst", action="store_true", help="skip the NST loss timing")
    p.add_argument("--no-startup", action="store_true",
                   help="skip timing the start-up of a 1-epoch demo run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plugins_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Measure training images/s of a plain loop, the engine solo and the cohort."""
    load_plugins(args.plugins)
    methods = expand_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    if not methods:
        raise KtBenchError("--methods needs at least one method name")
    for m in methods:
        build_method(m)
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise KtBenchError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise KtBenchError("--warmup must be >= 0")
    cfg = BenchConfig(args.teacher, args.student, methods, args.dataset, args.batch_size,
                      args.steps, args.warmup, args.repeats, args.device,
                      _precisions(args.precision, args.device), args.workers, not args.no_nst,
                      args.compile, not args.no_startup)
    result = run_bench(cfg)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def _precisions(text: str, device: str) -> tuple[str, ...]:
    """``--precision``'s comma-separated precisions, each resolved for ``device`` and checked
    against it, once each in the order given."""
    precisions: list[str] = []
    for p in (p.strip() for p in text.split(",") if p.strip()):
        resolved = resolve_precision(p, device)
        check_device_and_precision(device, resolved)
        if resolved not in precisions:
            precisions.append(resolved)
    if not precisions:
        raise KtBenchError("--precision needs at least one of auto, no, bf16, fp16")
    return tuple(precisions)
