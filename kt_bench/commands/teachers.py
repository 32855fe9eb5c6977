"""``kt-bench teachers fetch|list``: download the published CIFAR-100 teachers (RepDistiller's
``<name>_vanilla/ckpt_epoch_240.pth``) into a folder for ``run --teachers-dir``, verified
against the package's manifest or the hash recorded on first download; or show where each
stands. Light to import: torch loads only to check a downloaded file."""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from kt_bench.sweep import teacher_fetch


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``teachers`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser(
        "teachers", help=help,
        description="The CIFAR-100 teachers RepDistiller published (the ones the CRD table "
                    "was measured with), laid out for `kt-bench run --teachers-dir`. Without "
                    "an action: list.")
    actions = parser.add_subparsers(dest="action", metavar="{fetch,list}")
    fetch = actions.add_parser(
        "fetch", help="download the teachers, verify each and record its SHA-256",
        description="Download each teacher to a temporary file beside its place, check that "
                    "it arrived whole, matches the manifest's size and SHA-256 (or, where the "
                    "manifest has none, the SHA-256 recorded by the first fetch: trust on "
                    "first use) and loads as a checkpoint, then put it in place and record its "
                    "SHA-256 beside it (<file>.sha256). Files present and verified are skipped.")
    _add_folder_arg(fetch)
    fetch.add_argument("--only", nargs="+", metavar="NAME",
                       help="fetch only these teachers (kt-bench's or RepDistiller's names)")
    fetch.add_argument("--base-url", metavar="URL",
                       help="fetch from this mirror instead: URL/<name>_vanilla/"
                            "ckpt_epoch_240.pth (http://, https:// or file://)")
    fetch.add_argument("--force", action="store_true",
                       help="download files already present and verified again (still checked "
                            "against the manifest or the recorded hash)")
    listing = actions.add_parser(
        "list", help="the manifest's teachers and whether each is present and verified")
    _add_folder_arg(listing)
    return parser


def _add_folder_arg(parser: argparse.ArgumentParser) -> None:
    """The teachers folder option."""
    parser.add_argument("--to", metavar="DIR", default=teacher_fetch.DEFAULT_FOLDER,
                        help="the teachers folder, as given to run --teachers-dir "
                             f"(default: ./{teacher_fetch.DEFAULT_FOLDER})")


def run(args: argparse.Namespace) -> int:
    """Fetch the published teachers into a folder, or list where each stands there."""
    teachers = teacher_fetch.load_manifest()
    folder = Path(getattr(args, "to", teacher_fetch.DEFAULT_FOLDER))
    if args.action == "fetch":
        chosen = teacher_fetch.select(teachers, args.only)
        outcome = teacher_fetch.fetch(chosen, folder, args.base_url, args.force)
        fetched = sum(1 for v in outcome.values() if v == "fetched")
        print(f"{fetched} fetched, {len(outcome) - fetched} already there; use them with "
              f"`kt-bench run --teachers-dir {folder}`")
        return 0
    rows = [(t.model, t.r_name, teacher_fetch.state_of(t, folder), str(t.file_in(folder)))
            for t in teachers]
    print(tabulate(rows, headers=["teacher", "RepDistiller name", "state", "file"],
                   tablefmt="simple", disable_numparse=True))
    return 0
