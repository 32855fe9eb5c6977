"""A registered name with options (``resnet8`` + ``width=0.5``); option checks for builders."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kt_bench.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """A registered name plus the options passed to its builder."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str) -> Spec:
        """From a TOML value: a name string, or a table ``{name = ..., <option> = ...}``."""
        if isinstance(value, Spec):
            return value
        if isinstance(value, str) and value:
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            opts = {k: v for k, v in value.items() if k != "name"}
            return cls(value["name"], dict(sorted(opts.items())))
        raise ConfigError(f"{where}: expected a name or a table with 'name', got {value!r}")

    @property
    def label(self) -> str:
        """A short display name: ``resnet8`` or ``resnet8(width=0.5)``."""
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, stable for hashing."""
        return {"name": self.name, **dict(sorted(self.options.items()))}


def accepted_options(fn: Callable, fixed: Collection[str] = ()) -> list[str]:
    """The keyword options ``fn`` accepts, less the ``fixed`` ones the harness supplies."""
    params = inspect.signature(fn).parameters.values()
    return [
        p.name
        for p in params
        if p.name not in fixed and p.name != "self"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def check_options(
    fn: Callable, options: Mapping[str, Any], what: str, fixed: Collection[str] = (),
    extra: Collection[str] = (),
) -> None:
    """Raise a one-line ConfigError if ``options`` holds a key ``fn`` does not accept
    (``extra`` names keys accepted besides ``fn``'s own)."""
    accepted = [*accepted_options(fn, fixed), *extra]
    for key in options:
        if key not in accepted:
            raise ConfigError(
                f"unknown option '{key}' for {what}; accepted: {', '.join(accepted) or '(none)'}"
            )
