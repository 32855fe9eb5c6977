"""The method plugin API: a Method adds weighted loss terms to the student's cross-entropy.

A plugin subclasses :class:`Method`, declares the taps it needs, optionally builds trainable
parts of its own in :meth:`Method.setup` (they join the optimiser), and returns its unweighted
loss terms from the student's and the teacher's taps. ``a+b`` names are built here as the sum of
the members' weighted terms; nobody writes combinations by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kt_bench.errors import ConfigError
from kt_bench.registry import Registry
from kt_bench.spec import accepted_options, check_options

Taps = Mapping[str, torch.Tensor]
Shapes = Mapping[str, torch.Size]


class Method(nn.Module):
    """Base class of a knowledge-transfer method (an ``nn.Module`` so it can own parameters).

    Subclasses set ``default_weight`` and take their options as keyword arguments of
    ``__init__`` (each with a default); ``weight`` is always accepted and scales the method's
    terms. ``taps`` lists the canonical taps needed from both student and teacher.
    """

    name: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0

    def __init__(self, weight: float | None = None) -> None:
        super().__init__()
        self.weight = float(self.default_weight if weight is None else weight)
        self.taps: tuple[str, ...] = ()
        #: The cross-entropy weight this method trains with; None: the recipe's ``ce_weight``.
        #: Set by the option ``ce_weight``, which every method accepts.
        self.ce_weight: float | None = None

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher must run (any tap requested)."""
        return bool(self.taps)

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build trainable parts from the taps' shapes (one batch, seen before training)."""

    def loss_terms(self, student: Taps, teacher: Taps) -> dict[str, torch.Tensor]:
        """The method's unweighted loss terms, each a scalar tensor, keyed by term name."""
        return {}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """Weight of each term in ``epoch`` (0-based) of ``epochs``; default: ``weight`` always."""
        return {self.name: self.weight}

    def ce_scale(self, epoch: int, epochs: int) -> float:
        """Multiplier on the cross-entropy weight in ``epoch``; 0 turns the labels off."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        """The method's resolved options (for result rows and cell ids)."""
        out: dict[str, Any] = {"weight": self.weight}
        if self.ce_weight is not None:
            out["ce_weight"] = self.ce_weight
        for key in accepted_options(type(self).__init__):
            if key != "weight" and hasattr(self, key):
                out[key] = getattr(self, key)
        return out


class CombinedMethod(Method):
    """The sum of several registered methods' weighted terms (the ``a+b`` names)."""

    def __init__(self, members: list[Method]) -> None:
        super().__init__(weight=1.0)
        self.members = nn.ModuleList(members)
        self.taps = tuple(dict.fromkeys(t for m in members for t in m.taps))
        ce = {m.ce_weight for m in members if m.ce_weight is not None}
        if len(ce) > 1:
            names = "+".join(m.name for m in members)
            raise ConfigError(f"method '{names}': members set different ce_weight {sorted(ce)}")
        self.ce_weight = ce.pop() if ce else None

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Set up every member."""
        for m in self.members:
            m.setup(student_shapes, teacher_shapes)

    def loss_terms(self, student: Taps, teacher: Taps) -> dict[str, torch.Tensor]:
        """The union of the members' terms."""
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            out.update(m.loss_terms(student, teacher))
        return out

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """The union of the members' weights."""
        out: dict[str, float] = {}
        for m in self.members:
            out.update(m.term_weights(epoch, epochs))
        return out

    def ce_scale(self, epoch: int, epochs: int) -> float:
        """The product of the members' cross-entropy scales."""
        scale = 1.0
        for m in self.members:
            scale *= m.ce_scale(epoch, epochs)
        return scale

    def describe(self) -> dict[str, Any]:
        """Each member's options under its name."""
        return {m.name: m.describe() for m in self.members}


#: Method classes by name.
METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a Method subclass under ``name`` (also sets ``cls.name``)."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method('{name}') needs a Method subclass, got {cls!r}")
        cls.name = name
        return METHODS.register(name, cls)

    return wrap


def split_method_name(spec: str) -> list[str]:
    """``'kd+nst_poly'`` -> ``['kd', 'nst_poly']``, each checked against the registry."""
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise ConfigError(f"malformed method name '{spec}'; expected names joined by '+'")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"method '{spec}' names a member twice")
    for p in parts:
        METHODS.get(p)
    return parts


def build_method(spec: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """Instantiate method ``spec`` (``a`` or ``a+b+...``) with per-member ``options``.

    ``options`` maps a member name to its keyword options (e.g. ``{"kd": {"T": 2.0}}``);
    an unknown option is a one-line error listing the accepted ones.
    """
    options = options or {}
    members = []
    for part in split_method_name(spec):
        cls = METHODS.get(part)
        opts = dict(options.get(part, {}))
        ce_weight = opts.pop("ce_weight", None)
        check_options(cls.__init__, opts, f"method '{part}'", extra=("ce_weight",))
        try:
            member = cls(**opts)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"method '{part}': {exc}") from None
        if ce_weight is not None:
            if not isinstance(ce_weight, (int, float)) or ce_weight < 0:
                raise ConfigError(f"method '{part}': ce_weight must be a number >= 0")
            member.ce_weight = float(ce_weight)
        members.append(member)
    return members[0] if len(members) == 1 else CombinedMethod(members)
