"""Model registry and the builder that checks a model spec's options."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from kt_bench.errors import KtBenchError
from kt_bench.registry import Registry
from kt_bench.spec import Spec, resolve_options

#: Builders ``f(num_classes, in_channels, **options) -> nn.Module`` whose module has ``tap_map``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_FIXED = ("num_classes", "in_channels")


def register_model(name: str) -> Callable:
    """Decorator registering a model builder under ``name``."""
    return MODELS.decorator(name)


def build_model(spec: Spec | str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the zoo model ``spec``; unknown names, unknown options and options of the wrong
    type are one-line errors."""
    spec = Spec.parse(spec, "model")
    builder = MODELS.get(spec.name)
    options = resolve_options(builder, spec.options, f"model '{spec.name}'", _FIXED)
    model = builder(num_classes=num_classes, in_channels=in_channels, **options)
    if not isinstance(getattr(model, "tap_map", None), Mapping):
        raise KtBenchError(f"model '{spec.name}' was built without a tap_map")
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
