"""The method plugin API: a Method adds weighted loss terms to the student's cross-entropy.

A plugin subclasses :class:`Method`, declares what it needs of the engine (its taps, ...) in
one :class:`Needs`, optionally builds trainable parts of its own in :meth:`Method.setup` (they
join the optimiser), and returns its unweighted loss terms from the student's and the
teacher's taps and the step's :class:`Batch`. ``a+b`` names are built here as the sum of
the members' weighted terms; nobody writes combinations by hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kt_bench.core.errors import ConfigError, KtBenchError, PluginError, first_line
from kt_bench.core.interrupts import cell_failure
from kt_bench.core.options import plain, resolve_options
from kt_bench.core.registry import Registry

Taps = Mapping[str, torch.Tensor]
Shapes = Mapping[str, torch.Size]


class MethodBuildError(ConfigError):
    """A method plugin whose constructor raised for valid options (a bug in the plugin)."""


class NotApplicable(KtBenchError):
    """The method does not apply to this pair (e.g. FSP on stages of unequal channel counts,
    which the published table marks N/A); the cell's row gets status ``n/a`` and the reason."""


#: The stage of an initialisation epoch (see :class:`InitStage`) and of the others.
INIT, MAIN = "init", "main"


@dataclass(frozen=True)
class Batch:
    """What a method may read of the training batch besides the taps: the labels, the samples'
    indices in the training set (every process's own share), where the step is in training
    (``stage`` ``"init"`` or ``"main"``; ``epoch`` 0-based within the stage, of ``epochs``)
    and ``seed``, a seed for the step's own random draws (fixed by the cell's seed, the epoch
    and the step, so a resumed run draws the same)."""

    labels: torch.Tensor
    epoch: int = 0
    epochs: int = 1
    indices: torch.Tensor | None = None
    stage: str = MAIN
    seed: int = 0


#: The teacher's modes a method may ask for (see :attr:`Needs.teacher_mode`).
TEACHER_EVAL, TEACHER_BATCH_STATISTICS = "eval", "batch_statistics"
TEACHER_MODES = (TEACHER_EVAL, TEACHER_BATCH_STATISTICS)


@dataclass(frozen=True)
class InitStage:
    """An initialisation stage run before the recipe's epochs (RepDistiller's ``init_epochs``
    for AB, FT and FSP): ``epochs`` epochs whose loss is :meth:`Method.init_term_weights` over
    the terms :meth:`Method.loss_terms` returns for ``batch.stage == "init"``, without
    cross-entropy, optimised by its own SGD at a constant ``lr`` (None: the recipe's lr);
    parameters that get no gradient then are left alone (no weight decay either).
    ``trains_student``: whether the student's BatchNorm layers train in the stage (False: the
    student runs in eval mode, as RepDistiller's FT initialisation does)."""

    epochs: int
    lr: float | None = None
    trains_student: bool = True


def init_stage(epochs: int, lr: float | None = None, trains_student: bool = True
               ) -> InitStage | None:
    """The :class:`InitStage` of ``epochs`` epochs at ``lr`` (None where ``epochs`` is 0); a
    ValueError (the grid's one-line error) for epochs that are no integer >= 0 or an lr that
    is neither None nor > 0."""
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"init_epochs must be an integer >= 0, got {epochs}")
    if lr is not None and not lr > 0:
        raise ValueError(f"init_lr must be None (the recipe's lr) or > 0, got {lr}")
    if not epochs:
        return None
    return InitStage(int(epochs), None if lr is None else float(lr), trains_student)


@dataclass(frozen=True)
class Needs:
    """What a method needs of the engine, declared in one place.

    ``taps``: the canonical taps read from both student and teacher (none: the teacher never
    runs). ``teacher_mode``: ``"eval"`` (the frozen teacher's BatchNorm on its running
    statistics) or ``"batch_statistics"`` (on each batch's statistics, as mdistiller runs
    OFD's teacher; the engine runs a private train-mode copy, the shared teacher is
    untouched). ``labels``/``indices``: whether :meth:`Method.loss_terms` reads the batch's
    labels / the samples' indices in the training set (a caller that cannot give them gets a
    one-line error). ``init``: an :class:`InitStage`, or None. ``float32_terms``: whether the
    terms must be computed in float32 under bf16/fp16 autocast (the taps are cast to float32
    and autocast is off inside :meth:`Method.loss_terms`).
    """

    taps: tuple[str, ...] = ()
    teacher_mode: str = TEACHER_EVAL
    labels: bool = False
    indices: bool = False
    init: InitStage | None = None
    float32_terms: bool = False

    def __post_init__(self) -> None:
        if self.teacher_mode not in TEACHER_MODES:
            raise PluginError(f"Needs(teacher_mode={self.teacher_mode!r}) is invalid; "
                              f"accepted: {', '.join(TEACHER_MODES)}")
        object.__setattr__(self, "taps", tuple(self.taps))

    @property
    def teacher(self) -> bool:
        """Whether the teacher must run (any tap requested)."""
        return bool(self.taps)

    @property
    def init_epochs(self) -> int:
        """The initialisation stage's epochs (0 without one)."""
        return self.init.epochs if self.init is not None else 0


#: Attributes of earlier versions of the API that :class:`Needs` replaces.
_RETIRED = {
    "init_epochs": "needs.init (init_stage(epochs, lr))",
    "init_lr": "needs.init (init_stage(epochs, lr))",
    "init_trains_student": "needs.init (init_stage(..., trains_student=False))",
    "teacher_batch_statistics": 'Needs(teacher_mode="batch_statistics")',
    "float32_terms": "Needs(float32_terms=True)",
}

#: The one signature of :meth:`Method.loss_terms`.
_LOSS_TERMS_PARAMETERS = ["self", "student", "teacher", "batch"]


class Method(nn.Module):
    """Base class of a knowledge-transfer method (an ``nn.Module`` so it can own parameters).

    Subclasses set ``default_weight`` and take their options as keyword arguments of
    ``__init__``, each with a default that is a plain value (number, string, bool, list or
    None); ``weight`` is always accepted and scales the method's terms. What the method needs
    of the engine (its taps, the teacher's mode, the batch's labels or indices, an
    initialisation stage, float32 terms) is its :class:`Needs`: a class attribute ``needs``,
    or set on the instance where it depends on the options (``self.taps = ...`` is short for
    replacing ``needs.taps``).

    A method's options are data: :func:`build_method` records every keyword argument it was
    built with (defaults included) in :attr:`options`, cells store them, and the runner
    rebuilds the method from exactly those, whatever attributes the plugin keeps them in.
    """

    name: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0
    #: The cross-entropy weight the method trains with unless ``ce_weight`` is given; None:
    #: the recipe's.
    default_ce_weight: ClassVar[float | None] = None
    #: What the method needs of the engine (see :class:`Needs`).
    needs: Needs = Needs()

    def __init__(self, weight: float | None = None) -> None:
        super().__init__()
        self.weight = float(self.default_weight if weight is None else weight)
        self.needs = type(self).needs
        #: The cross-entropy weight this method trains with; None: the recipe's ``ce_weight``.
        #: Set by the option ``ce_weight``, which every method accepts.
        self.ce_weight: float | None = None
        #: The complete options this method was built with (set by :func:`build_method`).
        self.options: dict[str, Any] = {"weight": self.weight, "ce_weight": None}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        retired = [name for name in _RETIRED if name in vars(cls)]
        if retired:
            raise PluginError(f"method class {cls.__name__}: '{retired[0]}' is no longer read; "
                              f"declare it as {_RETIRED[retired[0]]}")
        parameters = list(inspect.signature(cls.loss_terms).parameters)
        if parameters != _LOSS_TERMS_PARAMETERS:
            raise PluginError(f"method class {cls.__name__}: loss_terms takes "
                              f"({', '.join(parameters)}); accepted: "
                              f"loss_terms(self, student, teacher, batch)")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RETIRED:
            raise PluginError(f"method {type(self).__name__}: '{name}' is no longer read; "
                              f"declare it as {_RETIRED[name]}")
        super().__setattr__(name, value)

    @property
    def taps(self) -> tuple[str, ...]:
        """The canonical taps the method reads (``needs.taps``)."""
        return self.needs.taps

    @taps.setter
    def taps(self, value: tuple[str, ...]) -> None:
        self.needs = dataclasses.replace(self.needs, taps=tuple(value))

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher must run (any tap requested)."""
        return self.needs.teacher

    def setup_data(self, labels: torch.Tensor, num_classes: int) -> None:
        """Read what the method needs of the training set (its labels, in sample-index order,
        e.g. CRD's memory banks and negative sampling); called once before :meth:`setup`."""

    def setup_teacher(self, teacher: nn.Module) -> None:
        """Read what the method needs of the frozen teacher itself (e.g. OFD's margins from the
        BatchNorm before each ReLU); called once before :meth:`setup`."""

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build trainable parts from the taps' shapes (one batch, seen before training)."""

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """The method's unweighted loss terms, each a scalar tensor, keyed by term name, from
        the student's and the teacher's taps and the step's :class:`Batch` (its labels, the
        samples' indices, the stage, epoch and seed)."""
        return {}

    def terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """:meth:`loss_terms`, in float32 with autocast off where ``needs.float32_terms``."""
        device = _device_type(student) if self.needs.float32_terms else None
        if device is not None and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.loss_terms(_float32(student), _float32(teacher), batch)
        return self.loss_terms(student, teacher, batch)

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """Weight of each term in ``epoch`` (0-based) of ``epochs``; default: ``weight`` always."""
        return {self.name: self.weight}

    def ce_scale(self, epoch: int, epochs: int) -> float:
        """Multiplier on the cross-entropy weight in ``epoch``; 0 turns the labels off."""
        return 1.0

    def init_term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """Weight of each term in initialisation ``epoch`` (0-based) of ``epochs``; default:
        ``weight`` on the method's own term."""
        return {self.name: self.weight}

    def facts(self) -> dict[str, Any]:
        """Values the method settled on while training that its result row should record
        (e.g. ``{"crd_nce_k": 4095}`` where a requested size had to be capped); keys named
        ``<method>_<what>`` (no dots: dotted columns are swept options)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The method's complete options, as cells store them (``ce_weight`` included)."""
        return dict(self.options)


def _device_type(taps: Taps) -> str | None:
    """The device type (``cpu``, ``cuda``) of the first tensor in ``taps``."""
    return next((v.device.type for v in taps.values() if isinstance(v, torch.Tensor)), None)


def _float32(taps: Taps) -> Taps:
    """``taps`` with every floating-point tensor in float32 (the casts keep gradients)."""
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in taps.items()}


class CrossEntropyOnly(Method):
    """No transfer: the student's cross-entropy only; the teacher never runs."""

    default_weight = 0.0

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """No terms of its own."""
        return {}


class CombinedMethod(Method):
    """The sum of several registered methods' weighted terms (the ``a+b`` names)."""

    def __init__(self, members: list[Method]) -> None:
        super().__init__(weight=1.0)
        self.members = nn.ModuleList(members)
        initialising = [m for m in members if m.needs.init is not None]
        if len(initialising) > 1:
            names = "+".join(m.name for m in members)
            raise ConfigError(f"method '{names}': at most one member may have an "
                              "initialisation stage")
        self.needs = Needs(
            taps=tuple(dict.fromkeys(t for m in members for t in m.taps)),
            teacher_mode=next((m.needs.teacher_mode for m in members
                               if m.needs.teacher_mode != TEACHER_EVAL), TEACHER_EVAL),
            labels=any(m.needs.labels for m in members),
            indices=any(m.needs.indices for m in members),
            init=initialising[0].needs.init if initialising else None)
        ce = {m.ce_weight for m in members if m.ce_weight is not None}
        if len(ce) > 1:
            names = "+".join(m.name for m in members)
            raise ConfigError(f"method '{names}': members set different ce_weight {sorted(ce)}")
        self.ce_weight = ce.pop() if ce else None

    def setup_data(self, labels: torch.Tensor, num_classes: int) -> None:
        """Every member reads the training set."""
        for m in self.members:
            m.setup_data(labels, num_classes)

    def setup_teacher(self, teacher: nn.Module) -> None:
        """Every member reads the teacher."""
        for m in self.members:
            m.setup_teacher(teacher)

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Set up every member."""
        for m in self.members:
            m.setup(student_shapes, teacher_shapes)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """The union of the members' terms (each member's in float32 where it asks)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            out.update(m.terms(student, teacher, batch))
        return out

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """The union of the members' weights."""
        out: dict[str, float] = {}
        for m in self.members:
            out.update(m.term_weights(epoch, epochs))
        return out

    def init_term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """The union of the initialising members' weights."""
        out: dict[str, float] = {}
        for m in self.members:
            if m.needs.init is not None:
                out.update(m.init_term_weights(epoch, epochs))
        return out

    def facts(self) -> dict[str, Any]:
        """The union of the members' facts."""
        out: dict[str, Any] = {}
        for m in self.members:
            out.update(m.facts())
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


def _check_weight(value: Any, key: str, what: str) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)
    if not ok:
        raise ConfigError(f"{what}: {key} = {value!r} is invalid; accepted: a finite number >= 0")


def resolve_member(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete options of registered method ``name`` (no ``+``): its constructor's
    defaults (``weight``: the class's ``default_weight``; ``ce_weight``: None, the recipe's)
    with ``options`` on top, type-checked, in the plain form cells store."""
    cls = METHODS.get(name)
    what = f"method '{name}'"
    opts = dict(options or {})
    ce_weight = opts.pop("ce_weight", cls.default_ce_weight)
    resolved = resolve_options(cls.__init__, opts, what)
    if resolved.get("weight") is None:
        resolved["weight"] = float(cls.default_weight)
    _check_weight(resolved["weight"], "weight", what)
    if ce_weight is not None:
        _check_weight(ce_weight, "ce_weight", what)
        ce_weight = float(ce_weight)
    resolved["ce_weight"] = ce_weight
    return plain(resolved)


def _build_member(name: str, resolved: Mapping[str, Any]) -> Method:
    cls = METHODS.get(name)
    kwargs = {k: v for k, v in resolved.items() if k != "ce_weight"}
    # the constructor gets the annotated types back (tuples where it asks for tuples)
    kwargs = resolve_options(cls.__init__, kwargs, f"method '{name}'")
    try:
        member = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a bad option value: the grid's error
        raise ConfigError(f"method '{name}': {exc}") from None
    except BaseException as exc:  # noqa: BLE001 - a broken plugin: its cells' error
        # one that calls sys.exit() too; an interrupt is raised again
        reason = first_line(cell_failure(exc, "it"))
        raise MethodBuildError(f"method '{name}' failed to build: {reason}") from None
    member.ce_weight = resolved.get("ce_weight")
    member.options = dict(resolved)
    return member


def build_method(spec: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """Instantiate method ``spec`` (``a`` or ``a+b+...``) with per-member ``options``.

    ``options`` maps a member name to its keyword options (e.g. ``{"kd": {"T": 2.0}}``);
    options not given take the constructor's defaults, and the built method records them all
    (:meth:`Method.describe`). An unknown option or a value of the wrong type is a one-line
    error listing what is accepted.
    """
    options = options or {}
    members = [_build_member(part, resolve_member(part, options.get(part)))
               for part in split_method_name(spec)]
    return members[0] if len(members) == 1 else CombinedMethod(members)


def _storable(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def method_config(spec: str, options: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Each member's complete options (``{"kd": {...}, "nst_poly": {...}}``), as a cell stores
    them; checked to round-trip: the method built from the stored form reports the same
    options, so nothing a cell runs with is lost. A plugin whose option cannot be stored (a
    default that is no plain value) is a one-line error.

    A combination may have options of its own, which replace its members' for it alone:
    ``options["crd+kd"] = {"kd": {"weight": 1.0}}`` (RepDistiller's CRD+KD weighs KD
    differently from its KD row)."""
    options = options or {}
    parts = split_method_name(spec)
    own = options.get(spec, {}) if len(parts) > 1 else {}
    config = {part: resolve_member(part, {**options.get(part, {}), **own.get(part, {})})
              for part in parts}
    for part, resolved in config.items():
        bad = [k for k, v in resolved.items() if not _storable(v)]
        if bad:
            raise ConfigError(f"method '{part}': option(s) {', '.join(bad)} cannot be "
                              "stored in a cell's config; defaults must be plain values "
                              "(numbers, strings, bools, lists or None)")
        stored = json.loads(json.dumps(resolved))
        try:
            rebuilt = _build_member(part, stored)
        except MethodBuildError:
            continue  # not the options' fault: the cells of this method fail, the grid runs
        if rebuilt.describe() != resolved:
            raise ConfigError(f"method '{part}': built from its stored options it reports "
                              f"other options ({rebuilt.describe()} vs {resolved}); "
                              "describe() must return the options it was built with")
    return config
