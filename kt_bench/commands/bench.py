"""``kt-bench bench``: training images/s of a plain loop, the engine solo, the cohort and the
fused cohort.

Imported only for this command (its defaults come from :mod:`kt_bench.bench.speed`, which
loads torch)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kt_bench.api.method import build_method
from kt_bench.api.plugins import load_plugins
from kt_bench.bench.speed import (
    DEMO_METHODS,
    BenchConfig,
    demo_setting,
    expand_methods,
    format_result,
    run_bench,
)
from kt_bench.commands.common import add_plugins_arg
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec, resolve_options
from kt_bench.core.precision import resolve_precision
from kt_bench.data.bundle import dataset_info
from kt_bench.models.zoo import HARNESS_OPTIONS, MODELS
from kt_bench.training.device import check_device_and_precision

#: How ``--teacher``, ``--student`` and ``--dataset`` take options.
SPEC_FORM = "NAME or NAME:OPTION=VALUE[,OPTION=VALUE...]"


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``bench`` command, described by ``help``, to ``subparsers``."""
    p = subparsers.add_parser("bench", help=help)
    p.add_argument("--teacher", help=f"{SPEC_FORM}, e.g. resnet56 (the default) or "
                                     "resnet8:width=0.5")
    p.add_argument("--student", help=f"{SPEC_FORM} (default: resnet20)")
    p.add_argument("--methods",
                   help="comma-separated methods, 'all' for every registered one (default: "
                        "the 8 demo methods); an initialisation stage (AB, FT, FSP) is "
                        "skipped: methods are timed in their main stage")
    p.add_argument("--dataset", help=f"a dataset held in memory, {SPEC_FORM} (cifar10, "
                                     "cifar100, digits:image_size=16, ...) instead of random "
                                     "CIFAR-shaped data")
    p.add_argument("--demo", action="store_true",
                   help="the demo grid's setting: resnet20 -> resnet8:width=0.5 on the "
                        "embedded digits at 16x16, its 8 methods, batch 64 (--teacher, "
                        "--student, --dataset, --methods, --batch-size replace its parts)")
    p.add_argument("--batch-size", type=int, help="images per step (default: 64)")
    p.add_argument("--steps", type=int, default=20,
                   help="steps per timed epoch (fewer where the dataset holds fewer batches)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (the fastest counts)")
    p.add_argument("--workers", type=int, help="the plain loop's DataLoader workers "
                                               "(default: min(8, CPUs))")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="no,bf16",
                   help="the precisions to measure, comma-separated, each against its own "
                        "bare-model limit (default no,bf16: fp32 and bf16 autocast)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's networks (solo and cohort; fusion does "
                        "not run compiled, so the fused cohort is not measured)")
    p.add_argument("--no-fused", action="store_true",
                   help="skip (d), the cohort trained as one fused network")
    p.add_argument("--no-nst", action="store_true", help="skip the NST loss timing")
    p.add_argument("--no-startup", action="store_true",
                   help="skip timing the start-up of a 1-epoch demo run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plugins_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Measure training images/s of a plain loop, the engine solo, the cohort and the fused
    cohort."""
    load_plugins(args.plugins)
    result = run_bench(bench_config(args))
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of the command line ``args``, checked."""
    setting = _setting(args)
    methods = setting["methods"]
    if not methods:
        raise KtBenchError("--methods needs at least one method name")
    for m in methods:
        build_method(m)
    _check_specs(setting)
    for flag in ("steps", "repeats"):
        if getattr(args, flag) < 1:
            raise KtBenchError(f"--{flag} must be >= 1")
    if setting["batch_size"] < 1:
        raise KtBenchError("--batch-size must be >= 1")
    if args.warmup < 0:
        raise KtBenchError("--warmup must be >= 0")
    return BenchConfig(**setting, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                       device=args.device, precisions=_precisions(args.precision, args.device),
                       workers=args.workers, nst=not args.no_nst, compile=args.compile,
                       startup=not args.no_startup, fused=not args.no_fused)


def _check_specs(setting: dict[str, Any]) -> None:
    """A one-line error, before anything is built, for an unknown model or dataset or an
    option one does not take."""
    for flag in ("teacher", "student"):
        spec = setting[flag]
        resolve_options(MODELS.get(spec.name), spec.options, f"--{flag} {spec.name}",
                        HARNESS_OPTIONS)
    if setting["dataset"] is not None:
        dataset_info(setting["dataset"])


def _setting(args: argparse.Namespace) -> dict[str, Any]:
    """Networks, data, methods and batch size: the defaults (or the demo's with ``--demo``),
    each replaced by its flag where given."""
    setting: dict[str, Any] = {"teacher": Spec("resnet56"), "student": Spec("resnet20"),
                               "dataset": None, "methods": tuple(DEMO_METHODS),
                               "batch_size": 64}
    if args.demo:
        setting.update(demo_setting())
    for flag in ("teacher", "student", "dataset"):
        if getattr(args, flag) is not None:
            setting[flag] = parse_spec(getattr(args, flag), f"--{flag}")
    if args.methods is not None:
        setting["methods"] = expand_methods([m.strip() for m in args.methods.split(",")
                                             if m.strip()])
    if args.batch_size is not None:
        setting["batch_size"] = args.batch_size
    return setting


def parse_spec(text: str, flag: str) -> Spec:
    """``text`` of the form :data:`SPEC_FORM` as a :class:`Spec` (a name may hold ':', as
    ``timm:resnet18``: the options start at the first ':'-separated part holding '='); a
    value is a boolean, an integer or a number where it reads as one, else a word. A bad form
    is a one-line error."""
    parts = text.split(":")
    at = next((i for i, part in enumerate(parts) if "=" in part), len(parts))
    name, options = ":".join(parts[:at]), ":".join(parts[at:])
    if not name or not all(parts[:at]) or (at < len(parts) and not options):
        raise KtBenchError(f"{flag}: expected {SPEC_FORM}, got {text!r}")
    spec: dict[str, Any] = {}
    for item in options.split(",") if options else ():
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key.isidentifier() or not value or key in spec:
            raise KtBenchError(f"{flag}: expected {SPEC_FORM}, got {text!r}")
        spec[key] = _value(value)
    return Spec(name, dict(sorted(spec.items())))


def _value(text: str) -> Any:
    """An option's value: ``true`` or ``false``, an integer, a number, else the word."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
