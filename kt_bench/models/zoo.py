"""Model registry and the builder that checks a model spec's options."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TypeVar

from torch import nn

from kt_bench.core.errors import KtBenchError, PluginError
from kt_bench.core.options import Spec, resolve_options
from kt_bench.core.registry import Registry, origin_of

#: Builders ``f(num_classes, in_channels, **options) -> nn.Module`` whose module has ``tap_map``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_FIXED = ("num_classes", "in_channels")
#: Given by the harness to the builders that take it: the side of the dataset's images.
_IMAGE_SIZE = "image_size"
#: The options the harness gives a model builder itself; a grid may not set them.
HARNESS_OPTIONS = (*_FIXED, _IMAGE_SIZE)


Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder ``f(num_classes, in_channels, **options)`` (a
    function or an nn.Module class) under ``name``; the module it builds has a ``tap_map``.

    The builder's other keyword arguments are the model's options, checked and resolved from
    its signature (:func:`~kt_bench.core.options.resolve_options`) as a method's or a
    dataset's. A builder that is not callable or does not take ``num_classes`` and
    ``in_channels`` is a one-line PluginError."""

    def wrap(builder: Builder) -> Builder:
        where = f"model '{name}' (from {origin_of(builder)})"
        if not callable(builder):
            raise PluginError(f"{where}: @register_model decorates a builder "
                              f"f(num_classes, in_channels, **options), not {builder!r}")
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [k for k in _FIXED if k not in params and not takes_any]
        if missing:
            raise PluginError(f"{where}: its builder does not take {', '.join(missing)}; "
                              "accepted: f(num_classes, in_channels, **options)")
        return MODELS.register(name, builder)

    return wrap


def build_model(spec: Spec | str, num_classes: int, in_channels: int = 3,
                image_size: int | None = None) -> nn.Module:
    """Build the zoo model ``spec`` for images of ``in_channels`` channels (and, to a builder
    that takes ``image_size``, of side ``image_size``); unknown names, unknown options and
    options of the wrong type are one-line errors."""
    spec = Spec.parse(spec, "model")
    builder = MODELS.get(spec.name)
    options = resolve_options(builder, spec.options, f"model '{spec.name}'", HARNESS_OPTIONS)
    if image_size is not None and _IMAGE_SIZE in inspect.signature(builder).parameters:
        options[_IMAGE_SIZE] = image_size
    model = builder(num_classes=num_classes, in_channels=in_channels, **options)
    if not isinstance(getattr(model, "tap_map", None), Mapping):
        raise KtBenchError(f"model '{spec.name}' was built without a tap_map")
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
