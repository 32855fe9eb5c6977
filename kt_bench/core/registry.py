"""One registry type for every kind of named thing: methods, models, datasets, grids."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Generic, TypeVar

from kt_bench.core.errors import PluginError, UnknownNameError

T = TypeVar("T")


def origin_of(obj: object) -> str:
    """The file ``obj`` is defined in (for a wrapper, the file of what it wraps); its repr
    where it has none."""
    try:
        obj = inspect.unwrap(obj)  # type: ignore[arg-type]
    except ValueError:  # a cycle of __wrapped__: use the object itself
        pass
    try:
        return inspect.getsourcefile(obj) or inspect.getfile(obj)  # type: ignore[arg-type]
    except TypeError:
        return repr(obj)


def import_modules(package: str, path: Iterable[str], skip: Collection[str] = ()) -> list[str]:
    """Import every module of ``package`` (whose ``__path__`` is ``path``) in name order, but
    private ``_`` ones and those named in ``skip``; importing a module registers its entries.
    Returns the names imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(path))
    names = [n for n in names if not n.startswith("_") and n not in skip]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class Family(Generic[T]):
    """A family of entries named ``<prefix>:<name>`` that a registry resolves on demand (e.g.
    ``timm:resnet18``) rather than holding one by one.

    ``resolve(name)`` returns the entry for the name after the prefix (or raises a one-line
    error); ``names(pattern)`` lists the family's names matching a shell-style pattern;
    ``about`` says in a line what the family is and how to see its names.
    """

    def __init__(self, prefix: str, resolve: Callable[[str], T], names: Callable[[str], list[str]],
                 about: str) -> None:
        self.prefix = prefix
        self.resolve = resolve
        self.names = names
        self.about = about


class Registry(Generic[T]):
    """Names mapped to objects of one kind, with the file each came from, and families of
    names resolved on demand (``prefix:name``).

    Registering a name twice from different places is an error naming both files; looking up
    an unknown name is an error listing the known names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._families: dict[str, Family[T]] = {}

    def register_family(self, family: Family[T]) -> Family[T]:
        """Add ``family``: its names ``<prefix>:<name>`` resolve through it."""
        if not family.prefix.isidentifier():
            raise PluginError(f"invalid {self.kind} family prefix {family.prefix!r}: a prefix "
                              "is a word of letters, digits and '_'")
        self._families[family.prefix] = family
        return family

    def families(self) -> list[Family[T]]:
        """The registered families, by prefix."""
        return [self._families[p] for p in sorted(self._families)]

    def register(self, name: str, obj: T, origin: str | None = None) -> T:
        """Register ``obj`` under ``name``; ``origin`` (a file) defaults to where obj is defined."""
        if not name or any(ch in "+:" or ch.isspace() for ch in name):
            raise PluginError(
                f"invalid {self.kind} name {name!r} (from {origin or origin_of(obj)}): "
                "names are non-empty and contain no '+', ':' or whitespace"
            )
        origin = origin or origin_of(obj)
        if name in self._entries:
            old = self._entries[name]
            same = old is obj or (
                getattr(old, "__qualname__", None) == getattr(obj, "__qualname__", object())
                and self._origins[name] == origin
            )
            if same:  # the same definition imported again
                self._entries[name] = obj
                return obj
            raise PluginError(
                f"duplicate {self.kind} name '{name}': defined in {self._origins[name]} "
                f"and again in {origin}"
            )
        self._entries[name] = obj
        self._origins[name] = origin
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        """A decorator form of :meth:`register`."""

        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str) -> T:
        """The object registered as ``name``, or resolved by the family its prefix names; an
        unknown name lists the known ones."""
        if name in self._entries:
            return self._entries[name]
        prefix, colon, rest = name.partition(":")
        if colon and prefix in self._families:
            return self._families[prefix].resolve(rest)
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """The one-line message for an unknown ``name``."""
        hint = difflib.get_close_matches(name, self.names(), n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        families = "".join(f"; or {f.prefix}:<name> ({f.about})" for f in self.families())
        return (f"unknown {self.kind} '{name}'{did_you_mean}; known: {', '.join(self.names())}"
                f"{families}")

    def origin(self, name: str) -> str:
        """The file that registered ``name``."""
        self.get(name)
        return self._origins[name]

    def unregister(self, name: str) -> None:
        """Remove ``name`` (used by tests and plugin reloads)."""
        self._entries.pop(name, None)
        self._origins.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted (a family's names are not among them)."""
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, object) pairs in name order."""
        for name in self.names():
            yield name, self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
