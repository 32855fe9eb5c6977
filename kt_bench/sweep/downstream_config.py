"""A grid's ``[[downstream]]`` tables: which evaluation (a registered kind with its dataset and
recipe) runs for which of the grid's finished cells."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.core.options import Spec, plain
from kt_bench.sweep.config import dataclass_from_table
from kt_bench.sweep.rows import UNIT_NAME

DOWNSTREAM_KEYS = ("name", "kind", "dataset", "only", "options")
#: The cell fields an ``only`` filter may name (as ``--only`` does).
FILTER_KEYS = ("dataset", "teacher", "student", "method", "seed")
_NAME = re.compile(UNIT_NAME)


@dataclass(frozen=True)
class Downstream:
    """One ``[[downstream]]`` table: evaluation ``name`` of ``kind`` on ``dataset`` with the
    kind's resolved ``options``, for the cells matching every ``only`` filter
    (``key=value[,value...]``; none: every cell)."""

    name: str
    kind: str
    dataset: Spec
    options: Any
    only: tuple[str, ...] = ()

    def config(self) -> dict[str, Any]:
        """What the unit runs with, as its ``config.json`` records it (with where the kind's
        recipe comes from)."""
        from kt_bench.downstream import DOWNSTREAM_KINDS

        return {"name": self.name, "kind": self.kind, "dataset": self.dataset.to_dict(),
                "options": plain(dataclasses.asdict(self.options)), "only": list(self.only),
                "source": DOWNSTREAM_KINDS.get(self.kind).source}

    def identity(self) -> dict[str, Any]:
        """What determines a unit's result (its id's hash): the kind, the dataset and the
        options that change what it computes (not the selection, the recipe's source text,
        nor the kind's ``run_only`` options)."""
        from kt_bench.downstream import DOWNSTREAM_KINDS

        options = DOWNSTREAM_KINDS.get(self.kind).result_options(self.options)
        return {"kind": self.kind, "dataset": self.dataset.to_dict(), "options": options}

    def to_table(self) -> dict[str, Any]:
        """The table a grid file would hold for this evaluation (read back by
        :func:`downstream_from_tables`)."""
        return {"name": self.name, "kind": self.kind, "dataset": self.dataset.to_dict(),
                "only": list(self.only), "options": plain(dataclasses.asdict(self.options))}


def identity_values(identity: Mapping[str, Any], key: str) -> set[str]:
    """What a filter value may give to match a cell's ``key`` (its row identity): the label
    (``resnet8(width=0.5)``) or the name before its options (``resnet8``)."""
    value = str(identity.get(key, ""))
    return {value, value.split("(", 1)[0]}


def matches(identity: Mapping[str, Any], only: tuple[str, ...]) -> bool:
    """Whether the cell of row ``identity`` passes every ``only`` filter."""
    for flt in only:
        key, _, values = flt.partition("=")
        if not identity_values(identity, key) & set(values.split(",")):
            return False
    return True


def _filters(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of \"key=value\" strings, e.g. "
                          "[\"student=wrn_16_2\"]")
    for flt in value:
        key, sep, values = flt.partition("=")
        if not sep or key not in FILTER_KEYS or not values:
            raise ConfigError(f"{where}: '{flt}' is invalid; accepted: key=value[,value...] "
                              f"with key one of {', '.join(FILTER_KEYS)}")
    return tuple(value)


def downstream_from_table(table: Any, where: str) -> Downstream:
    """One ``[[downstream]]`` table, its kind, dataset and options checked (data is not
    loaded); errors name ``where`` and the key."""
    from kt_bench.downstream import DOWNSTREAM_KINDS

    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table with kind and dataset")
    for key in table:
        if key not in DOWNSTREAM_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; accepted: "
                              f"{', '.join(DOWNSTREAM_KEYS)}")
    for key in ("kind", "dataset"):
        if key not in table:
            raise ConfigError(f"{where}: missing key '{key}'")
    if not isinstance(table["kind"], str):
        raise ConfigError(f"{where}.kind must be a name; known: "
                          f"{', '.join(DOWNSTREAM_KINDS.names())}")
    try:
        kind = DOWNSTREAM_KINDS.get(table["kind"])
    except KtBenchError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    dataset = Spec.parse(table["dataset"], f"{where}.dataset")
    name = table.get("name", f"{kind.name}-{dataset.name}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}.name = {name!r} is invalid; accepted: a folder name of "
                          "letters, digits, '.', '_' and '-'")
    options = dataclass_from_table(kind.Options, table.get("options", {}), f"{where}.options")
    try:
        kind.check(dataset, options)
    except KtBenchError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Downstream(name, kind.name, dataset, options,
                      _filters(table.get("only", []), f"{where}.only"))


def downstream_from_tables(value: Any, source: str, by_selection: bool = False
                           ) -> list[Downstream]:
    """A grid's ``downstream`` array of tables; names are unique within it (with
    ``by_selection``, as a run folder records the parts of a grid, unique with their
    ``only`` filters)."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: downstream must be an array of tables ([[downstream]])")
    units = [downstream_from_table(t, f"{source}: downstream[{i}]") for i, t in enumerate(value)]
    keys = [(u.name, u.only if by_selection else ()) for u in units]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"{source}: two downstream tables are named '{key[0]}'; give "
                              "each its own name")
    return units
