"""A cohort's students stepped as one fused network (:mod:`kt_bench.training.fusion`): one
forward pass for all of them on the shared batch, each member's taps and logits sliced out
for its own method's terms, one backward pass of the summed losses, then one SGD step over the
fused weights (:class:`FusedSGD`; each member's own optimiser on its slice of the gradients
where their hyper-parameters differ).

A member whose method raises leaves the group (the others go on, and the group is rebuilt
without it before the next batch); a failure of the fused pass itself ends fusion for the
cohort: the batch is taken again member by member and the cohort trains unfused from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.sgd import sgd

from kt_bench.api.method import MAIN
from kt_bench.core.errors import first_line
from kt_bench.core.interrupts import is_stop
from kt_bench.training.fusion import (
    FusedStudents,
    NotFusable,
    check_fusable,
    fused_memory_format,
)
from kt_bench.training.lifecycle import StepLoss, TeacherTaps, in_layout, taps_loss

#: ``log(line)``: where fusion says what it did (a member left, fusion ended).
Log = Callable[[str], None]


class FusionFailed(Exception):
    """The fused forward or backward pass raised (``__cause__`` says what)."""


class _Mismatch(Exception):
    """The members' optimisers cannot take one fused step (different hyper-parameters, or
    momentum kept by some and not by others)."""


#: The hyper-parameters of a member's SGD that one fused step needs equal in all members.
_SHARED = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class FusedSGD:
    """One SGD step over the fused students' parameters for every member at once, as each
    member's own SGD would take it on its slice (the same element-wise arithmetic). The
    momentum buffers are fused too; each member's optimiser state holds views of its slices,
    so its state dict, checkpoint and later unfused steps are those of an unfused run. The
    members' optimisers then step only what is theirs alone (their methods' parameters)."""

    def __init__(self, fused: FusedStudents, optimizers: Sequence[Any]) -> None:
        self.tensors = fused.parameters()
        self.optimizers = [getattr(o, "optimizer", o) for o in optimizers]  # Accelerate's
        if not all(isinstance(o, torch.optim.SGD) for o in self.optimizers):
            raise _Mismatch("not SGD")
        self.buffers = self._gather()

    def _group(self, i: int, p: nn.Parameter) -> dict[str, Any]:
        return next(g for g in self.optimizers[i].param_groups
                    if any(q is p for q in g["params"]))

    def _gather(self) -> list[torch.Tensor | None]:
        buffers: list[torch.Tensor | None] = []
        for whole, own, rows in self.tensors:
            held = [self.optimizers[i].state.get(p, {}).get("momentum_buffer")
                    for i, p in enumerate(own)]
            if all(b is None for b in held):
                buffers.append(None)
                continue
            if any(b is None for b in held):
                raise _Mismatch("momentum kept by some members only")
            buf = torch.empty_like(whole)
            for i, b in enumerate(held):
                buf[rows(i)].copy_(b)
            buffers.append(buf)
        self._view_buffers(buffers)
        return buffers

    def _view_buffers(self, buffers: list[torch.Tensor | None]) -> None:
        for (_, own, rows), buf in zip(self.tensors, buffers, strict=True):
            if buf is not None:
                for i, p in enumerate(own):
                    self.optimizers[i].state[p]["momentum_buffer"] = buf[rows(i)]

    def step(self) -> None:
        """Step every fused parameter that has a gradient and clear the gradients (a
        :class:`_Mismatch`, before any change, where the members' hyper-parameters differ)."""
        first = [self._group(i, p) for i, p in enumerate(self.tensors[0][1])]
        shared = {k: first[0][k] for k in _SHARED}
        if any(any(g[k] != shared[k] for k in _SHARED) for g in first[1:]):
            raise _Mismatch("the members' hyper-parameters differ")
        live = [(n, t[0]) for n, t in enumerate(self.tensors) if t[0].grad is not None]
        bufs = [self.buffers[n] for n, _ in live]
        sgd([w for _, w in live], [w.grad for _, w in live], bufs, **shared)
        if shared["momentum"] != 0:
            for (n, _), buf in zip(live, bufs, strict=True):
                if self.buffers[n] is None:
                    self.buffers[n] = buf
            self._view_buffers(self.buffers)
        for _, w in live:
            w.grad = None

    def release(self) -> None:
        """Give each member's optimiser momentum buffers of its own again."""
        for (_, own, _), buf in zip(self.tensors, self.buffers, strict=True):
            if buf is not None:
                for i, p in enumerate(own):
                    state = self.optimizers[i].state[p]
                    state["momentum_buffer"] = state["momentum_buffer"].clone()


class FusedGroup:
    """The fused network of ``planned`` members' students (see :class:`FusedStudents`);
    with ``probe``, the network is first checked (:func:`check_fusable`: a
    :class:`~kt_bench.training.fusion.NotFusable` where fusing changes what it computes)."""

    def __init__(self, planned: Sequence[Any], accelerator: Accelerator,
                 probe: torch.Tensor | None) -> None:
        self.planned = list(planned)
        students = [_student(p, accelerator) for p in planned]
        self.taps = tuple(dict.fromkeys(t for p in planned for t in p.member.method.taps))
        self.layout = fused_memory_format(students, accelerator.device)
        if probe is not None:
            check_fusable(students, self.taps, probe.to(accelerator.device), self.layout)
        self.fused = FusedStudents(students, self.taps, self.layout)
        self.fused.train()
        try:
            self.sgd: FusedSGD | None = FusedSGD(self.fused, [p.optimizer for p in planned])
        except _Mismatch:
            self.sgd = None  # each member's optimiser on its slice of the gradients

    @property
    def members(self) -> list[Any]:
        """The members the group was built of (a failed one stays until it is rebuilt)."""
        return [p.member for p in self.planned]

    def healthy(self) -> bool:
        """Whether every member of the group is still training."""
        return all(p.member.error is None for p in self.planned)

    def step(self, accelerator: Accelerator, x: torch.Tensor, labels: torch.Tensor,
             indices: torch.Tensor, step_seed: int, read: dict | None
             ) -> list[tuple[Any, StepLoss]]:
        """One step of every healthy member on batch ``x``; the members that stepped, each
        with its loss. A member whose terms or optimiser raise is failed alone; a failure of
        the fused passes is a :class:`FusionFailed`, with no member stepped."""
        try:
            with accelerator.autocast():
                taps = self.fused.forward(in_layout(x, self.layout))
        except BaseException as exc:  # noqa: BLE001 - an interrupt is raised again
            raise _failed(exc) from exc
        losses = []
        for i, p in enumerate(self.planned):
            if p.member.error is not None:
                continue
            try:
                method = p.member.method
                with accelerator.autocast():
                    out = taps_loss(method, taps[i],
                                    TeacherTaps.of(method, read) if read is not None else None,
                                    p.plan.batch(labels, indices, step_seed), p.plan)
                losses.append((p, out))
            except BaseException as exc:  # noqa: BLE001 - this student stops, the rest go on
                p.member.fail(exc)
        if losses:
            try:
                accelerator.backward(sum(out.loss for _, out in losses))
            except BaseException as exc:  # noqa: BLE001
                raise _failed(exc) from exc
        self._step_students()
        stepped = []
        for p, out in losses:
            try:
                p.optimizer.step()
                p.optimizer.zero_grad(set_to_none=True)
                stepped.append((p, out))
            except BaseException as exc:  # noqa: BLE001
                p.member.fail(exc)
        return stepped

    def _step_students(self) -> None:
        """The students' step: one fused SGD step where the members' optimisers agree, else
        each member's gradients handed to its own optimiser."""
        if self.sgd is not None:
            try:
                with torch.no_grad():
                    self.sgd.step()
                return
            except _Mismatch:
                self.sgd.release()
                self.sgd = None
            except BaseException as exc:  # noqa: BLE001 - an interrupt is raised again
                raise _failed(exc) from exc
        self.fused.share_grads()

    def release(self) -> None:
        """Give the members tensors (and momentum buffers) of their own again."""
        if self.sgd is not None:
            self.sgd.release()
        self.fused.release()


def _failed(exc: BaseException) -> FusionFailed:
    if is_stop(exc):  # an interrupt, an exit: the whole run stops
        raise exc
    return FusionFailed(first_line(exc))


def _student(p: Any, accelerator: Accelerator) -> nn.Module:
    return accelerator.unwrap_model(p.member.trainee).student


class CohortFusion:
    """Fusion over a cohort's training: each epoch a :class:`FusedGroup` of the members that
    may fuse (rebuilt where they change, or one fails), until the cohort ends or the fused
    passes fail (``enabled`` False: never; the members then train one by one)."""

    def __init__(self, enabled: bool, accelerator: Accelerator, probe: torch.Tensor | None,
                 log: Log) -> None:
        self.enabled = enabled
        self.accelerator = accelerator
        self.probe = probe  # checked against once, on the first group built
        self.log = log
        self.group: FusedGroup | None = None

    def plan(self, planned: Sequence[Any]) -> None:
        """Fuse the members of ``planned`` (this epoch's) that may fuse."""
        wanted = [p for p in planned if p.member.error is None and p.plan.stage == MAIN]
        if (self.group is not None and self.group.healthy()
                and [id(p.member) for p in wanted] == [id(m) for m in self.group.members]):
            self.group.planned = wanted  # this epoch's plans, the same students
            return
        self._build(wanted)

    def refresh(self) -> None:
        """Rebuild the group without its members that failed since it was built."""
        if self.group is not None and not self.group.healthy():
            self._build([p for p in self.group.planned if p.member.error is None])

    def _build(self, planned: list[Any]) -> None:
        self.close()
        if self.enabled and len(planned) >= 2:
            try:
                self.group = FusedGroup(planned, self.accelerator, self.probe)
            except NotFusable as exc:
                self.enabled = False
                self.log(f"the students train one by one: they cannot be fused ({exc})")
            except Exception as exc:  # noqa: BLE001 - fusion is an optimisation: train unfused
                self.enabled = False
                self.log(f"the students train one by one: fusing them failed "
                         f"({first_line(exc)})")
            self.probe = None

    def grouped(self) -> set[int]:
        """The ``id`` of each member in the group (none without one)."""
        return {id(m) for m in self.group.members} if self.group is not None else set()

    def fail(self, exc: FusionFailed) -> None:
        """End fusion for the cohort after the fused passes failed with ``exc``."""
        self.enabled = False
        self.close()
        self.log(f"fused training failed ({exc}); the students go on one by one")

    def close(self) -> None:
        """Give the members tensors of their own again."""
        if self.group is not None:
            self.group.release()
            self.group = None
