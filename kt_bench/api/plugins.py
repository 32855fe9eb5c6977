"""Finding plugins: the built-in methods package, plugin folders and installed entry points.

A plugin file registers what it defines when it is imported: methods with
``@register_method``, models with ``@register_model`` (``kt_bench.models``) and datasets with
``@register_dataset`` (``kt_bench.data``), any of them in one file. Entry points (group
``kt_bench.methods``) may name a Method class or any module that registers on import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from kt_bench.api.method import METHODS, Method
from kt_bench.core.errors import KtBenchError, PluginError, first_line

BUILTIN_PACKAGE = "kt_bench.methods"
ENTRY_POINT_GROUP = "kt_bench.methods"
ENV_VAR = "KT_BENCH_PLUGINS"

_loaded: set[str] = set()


def _once(key: str) -> bool:
    if key in _loaded:
        return False
    _loaded.add(key)
    return True


def load_builtin_methods() -> None:
    """Import every module of the built-in methods package (the checkout's ``methods/``)."""
    pkg = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and _once(f"{BUILTIN_PACKAGE}.{info.name}"):
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")


def load_plugin_file(path: Path) -> None:
    """Import one plugin file; an import failure is a one-line error naming the file."""
    path = path.resolve()
    if not _once(str(path)):
        return
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"kt_bench_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except KtBenchError as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one line
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin {path} failed to import: {first_line(exc)}") from None


def load_plugin_dir(folder: str | os.PathLike) -> None:
    """Import every ``*.py`` file (not starting with ``_``) of ``folder``, in name order; each
    registers the methods, models and datasets it defines."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PluginError(f"plugin folder {folder} does not exist or is not a folder")
    for path in sorted(folder.glob("*.py")):
        if not path.name.startswith("_"):
            load_plugin_file(path)


def load_entry_points() -> None:
    """Load the ``kt_bench.methods`` entry points of installed packages.

    An entry point may name a module (which registers its methods on import) or a Method
    subclass (registered under the entry point's name unless it registered itself).
    """
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not _once(f"ep:{ep.name}={ep.value}"):
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001
            raise PluginError(
                f"entry point '{ep.name} = {ep.value}' ({ENTRY_POINT_GROUP}) failed to load: "
                f"{first_line(exc)}"
            ) from None
        if inspect.isclass(obj) and issubclass(obj, Method) and not obj.name:
            obj.name = ep.name
            METHODS.register(ep.name, obj)


def plugin_dirs_from_env() -> list[str]:
    """Folders listed in ``KT_BENCH_PLUGINS`` (separated by ``os.pathsep``)."""
    return [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def load_plugins(dirs: Iterable[str | os.PathLike] = ()) -> None:
    """Load all plugins: the built-in methods, the folders of ``KT_BENCH_PLUGINS``, ``dirs``,
    then entry points. (Built-in models and datasets register when their packages are
    imported.)"""
    load_builtin_methods()
    for folder in [*plugin_dirs_from_env(), *dirs]:
        load_plugin_dir(folder)
    load_entry_points()
