"""The settings of a run besides its grid, one declaration for both ways of giving them: the
flags of ``kt-bench run`` and the keywords of ``kt_bench.run``, which are checked here. Light
to import (no torch)."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kt_bench.core.errors import KtBenchError

#: What a Python value of each kind of setting may be, in words for an error.
KIND_WORDS = {
    "path": "a path (str or os.PathLike)",
    "paths": "a path or a list of paths",
    "text": "a string",
    "int": "an integer",
    "bool": "True or False",
    "names": "comma-separated names or a list of names",
    "ints": "an integer, comma-separated integers or a list of integers",
    "filters": "'key=value', a list of them, or a dict of key -> value(s)",
}


def _setting(default: Any, kind: str) -> Any:
    """A field of :class:`RunSettings` with its ``default`` and the ``kind`` of value it takes."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


@dataclass
class RunSettings:
    """Everything a run is told besides its grid: the flags of ``kt-bench run``, by their
    names in snake_case (a ``--no-X`` flag is ``X = False``), with the same defaults."""

    out: str | None = _setting(None, "path")
    #: The methods replacing the grid's: comma-separated text or a list ("all": every one).
    methods: str | list[str] | None = _setting(None, "names")
    epochs: int | None = _setting(None, "int")
    #: The teacher's epochs replacing the grid's ``teacher_recipe`` epochs.
    teacher_epochs: int | None = _setting(None, "int")
    #: The seeds replacing the grid's: comma-separated text or a list of integers.
    seeds: str | list[int] | None = _setting(None, "ints")
    device: str = _setting("auto", "text")
    precision: str = _setting("auto", "text")
    cohort: bool = _setting(True, "bool")
    #: Whether a cohort's students train as one fused network where that is measured to pay.
    fuse: bool = _setting(True, "bool")
    compile: bool = _setting(False, "bool")
    teacher_cache: str | None = _setting(None, "path")
    data_root: str | None = _setting(None, "path")
    only: list[str] = _setting([], "filters")
    teacher_checkpoint: str | None = _setting(None, "path")
    teachers_dir: str | None = _setting(None, "path")
    dry_run: bool = _setting(False, "bool")
    log_with: str | None = _setting(None, "text")
    report: bool = _setting(True, "bool")
    #: Whether the grid's ``[[downstream]]`` evaluations run after their cells.
    downstream: bool = _setting(True, "bool")
    #: How the table's changes against the student are corrected: holm, bh or none.
    correct: str = _setting("holm", "text")
    launcher: str | None = _setting(None, "text")
    wait: bool = _setting(True, "bool")
    partition: str | None = _setting(None, "text")
    gpus_per_job: int | None = _setting(None, "int")
    cpus_per_job: int | None = _setting(None, "int")
    mem_gb: int | None = _setting(None, "int")
    time_min: int | None = _setting(None, "int")
    array_parallelism: int | None = _setting(None, "int")
    max_array_size: int | None = _setting(None, "int")
    account: str | None = _setting(None, "text")
    qos: str | None = _setting(None, "text")
    plugins: list[str] = _setting([], "paths")
    #: Whether the command line gave these: errors then name flags (``--epochs``), else
    #: keywords (``epochs``), and where a run's start-up time went is printed.
    cli: bool = False

    def flag(self, key: str) -> str:
        """How an error names the setting ``key``: ``--teachers-dir`` or ``teachers_dir``."""
        return "--" + key.replace("_", "-") if self.cli else key


#: Each setting a user chooses (all but how they were given), with the kind of value it takes.
SETTING_KINDS = {f.name: f.metadata["kind"] for f in dataclasses.fields(RunSettings)
                 if f.name != "cli"}
SETTING_NAMES = tuple(SETTING_KINDS)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _filters(value: Any) -> list[str] | None:
    """``only`` as the ``key=value[,value...]`` texts of the command line (None: not a
    kind of value it takes)."""
    if isinstance(value, str):
        return [value]
    if _is_list(value) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, Mapping):
        return [f"{k}={','.join(map(str, v)) if _is_list(v) else v}" for k, v in value.items()]
    return None


def _converted(kind: str, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` is of ``kind``, and the value as :class:`RunSettings` holds it."""
    if kind == "path":
        return _is_path(value), os.fspath(value) if _is_path(value) else value
    if kind == "paths":
        values = [value] if _is_path(value) else value
        ok = _is_list(values) and all(_is_path(v) for v in values)
        return ok, [os.fspath(v) for v in values] if ok else value
    if kind == "text":
        return isinstance(value, str), value
    if kind == "int":
        return _is_int(value), value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "names":
        ok = isinstance(value, str) or (_is_list(value) and all(isinstance(v, str)
                                                                for v in value))
        return ok, list(value) if _is_list(value) else value
    if kind == "ints":
        if _is_int(value):
            return True, [value]
        ok = isinstance(value, str) or (_is_list(value) and all(map(_is_int, value)))
        return ok, list(value) if _is_list(value) else value
    filters = _filters(value)
    return filters is not None, filters


def settings_from_keywords(keywords: Mapping[str, Any], who: str,
                           extra: tuple[str, ...] = ()) -> RunSettings:
    """The :class:`RunSettings` that ``keywords`` (given to ``who``, e.g. ``kt_bench.run``)
    choose; None leaves a setting's default. An unknown name, or a value of the wrong kind,
    is a one-line :class:`KtBenchError` naming the accepted ones. ``extra`` names keywords
    the caller takes itself (left out here)."""
    accepted = [*SETTING_NAMES, *extra]
    values = {}
    for key, value in keywords.items():
        if key in extra:
            continue
        if key not in SETTING_KINDS:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KtBenchError(f"{who}: unknown setting '{key}'{hint}; accepted: "
                               f"{', '.join(accepted)}")
        if value is None:
            continue
        kind = SETTING_KINDS[key]
        ok, converted = _converted(kind, value)
        if not ok:
            raise KtBenchError(f"{who}: {key} = {_shown(value)} is invalid; accepted: "
                               f"{KIND_WORDS[kind]}")
        values[key] = converted
    return RunSettings(**values)
