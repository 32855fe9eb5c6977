"""Named feature taps: capture intermediate outputs of any nn.Module with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from kt_bench.core.errors import KtBenchError

#: The tap every model has: its output. It needs no hook.
LOGITS = "logits"


class TapRecorder:
    """Records the outputs of the modules behind canonical tap names during a forward pass.

    ``tap_map`` maps canonical names (``stage1``, ``pool``, ...) to module names as given by
    ``model.named_modules()``. A module name ending in ``:input`` records the module's input
    instead of its output (e.g. a pre-activation map feeding a ReLU). ``logits`` is always the
    model's return value and needs no entry. A model's ``tap_transforms`` (tap name ->
    function) turn a raw output into the tap's value, e.g. a transformer's tokens into an
    image-like (B, C, H, W) map.
    """

    def __init__(self, model: nn.Module, tap_map: Mapping[str, str], wanted: Iterable[str]):
        self.wanted = tuple(dict.fromkeys(w for w in wanted if w != LOGITS))
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        self._transforms: Mapping[str, Callable] = getattr(model, "tap_transforms", {})
        modules = dict(model.named_modules())
        for tap in self.wanted:
            if tap not in tap_map:
                known = ", ".join(sorted({*tap_map, LOGITS}))
                raise KtBenchError(
                    f"model {type(model).__name__} has no tap '{tap}'; known: {known}")
            target, _, which = tap_map[tap].partition(":")
            if target not in modules:
                raise KtBenchError(
                    f"tap '{tap}' points at module '{target}', which {type(model).__name__} lacks"
                )
            self._handles.append(modules[target].register_forward_hook(self._hook(tap, which)))

    def _hook(self, tap: str, which: str):
        transform = self._transforms.get(tap)

        def hook(module, inputs, output):
            value = inputs[0] if which == "input" else output
            self._outputs[tap] = transform(value) if transform else value

        return hook

    def collect(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The taps recorded by the last forward pass, plus ``logits``; clears the record."""
        missing = [t for t in self.wanted if t not in self._outputs]
        if missing:
            raise KtBenchError(f"taps {missing} were not reached by the forward pass")
        out = dict(self._outputs)
        out[LOGITS] = logits
        self._outputs.clear()
        return out

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
