"""A registered name with options (``resnet8`` + ``width=0.5``); option checks for builders."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kt_bench.core.errors import ConfigError


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


#: Model options that download weights (torchvision's ``weights``, timm's ``pretrained``),
#: left out where only shapes are needed.
DOWNLOAD_OPTIONS = ("weights", "pretrained")


def without_downloads(spec: Spec) -> Spec:
    """``spec`` without the options that download weights (for shapes and counts)."""
    return Spec(spec.name, {k: v for k, v in spec.options.items() if k not in DOWNLOAD_OPTIONS})


def accepted_options(fn: Callable, fixed: Collection[str] = ()) -> list[str]:
    """The keyword options ``fn`` accepts, less the ``fixed`` ones the harness supplies."""
    params = inspect.signature(fn).parameters.values()
    return [
        p.name
        for p in params
        if p.name not in fixed and p.name != "self"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def passes_other_options(fn: Callable) -> bool:
    """Whether ``fn`` takes ``**options``: the options it does not name pass through it
    unchecked to what it wraps (e.g. timm's ``create_model``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def check_options(
    fn: Callable, options: Mapping[str, Any], what: str, fixed: Collection[str] = (),
    extra: Collection[str] = (),
) -> None:
    """Raise a one-line ConfigError if ``options`` holds a key ``fn`` does not accept
    (``extra`` names keys accepted besides ``fn``'s own; a function taking ``**options``
    accepts every key but the ``fixed`` ones): the first check of
    :func:`resolve_options`, the one resolver of every method's, model's and dataset's
    options."""
    accepted = [*accepted_options(fn, fixed), *extra]
    open_ended = passes_other_options(fn)
    for key in options:
        if key not in accepted and (not open_ended or key in fixed):
            raise ConfigError(
                f"unknown option '{key}' for {what}; accepted: {', '.join(accepted) or '(none)'}"
            )


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` (as read from TOML or JSON) fits the type ``hint``; returns (ok,
    converted value): an int where a float is expected becomes a float, a list where a tuple
    is expected a tuple. Hints it does not know accept anything."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, conv = coerce(value, arg)
            if ok:
                return True, conv
        return False, value
    if hint is type(None) or hint is None:
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        conv = []
        for v in value:
            ok, c = coerce(v, args[0]) if args else (True, v)
            if not ok:
                return False, value
            conv.append(c)
        return True, tuple(conv) if origin is tuple else conv
    return True, value


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def type_words(hint: Any) -> str:
    """``hint`` in words for an error message (``an integer``, ``a number or None``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_words(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None (leave it out)"
    if origin in (tuple, list):
        args = typing.get_args(hint)
        return f"a list of {type_words(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    return _TYPE_WORDS.get(hint, str(hint).replace("typing.", ""))


def option_hints(fn: Callable) -> dict[str, Any]:
    """The type hints of ``fn``'s parameters; {} where they cannot be resolved."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a plugin's odd annotation only skips the type checks
        return {}


def resolve_options(fn: Callable, options: Mapping[str, Any], what: str,
                    fixed: Collection[str] = ()) -> dict[str, Any]:
    """``fn``'s complete keyword options: its defaults with ``options`` on top, each value
    checked against its annotation (and converted: int to float, list to tuple).

    Unknown keys, wrong types, non-finite numbers and options without a default that are not
    given are one-line ConfigErrors naming ``what``."""
    check_options(fn, options, what, fixed)
    hints = option_hints(fn)
    params = inspect.signature(fn).parameters
    out: dict[str, Any] = {}
    for name in accepted_options(fn, fixed):
        if name in options:
            value = options[name]
        elif params[name].default is not inspect.Parameter.empty:
            value = params[name].default
        else:
            raise ConfigError(f"{what}: option '{name}' has no default; give it")
        if name in hints:
            ok, conv = coerce(value, hints[name])
            if not ok:
                raise ConfigError(f"{what}: option {name} = {value!r} is invalid; accepted: "
                                  f"{type_words(hints[name])}")
            value = conv
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{what}: option {name} = {value!r} is invalid; accepted: a "
                              "finite number")
        out[name] = value
    if passes_other_options(fn):
        named = set(accepted_options(fn, fixed)) | set(fixed)
        out.update({k: v for k, v in options.items() if k not in named})
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON holds it (tuples become lists), for cell configs and ids."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
