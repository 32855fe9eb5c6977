"""Students of one architecture fused into one network (horizontal fusion, as HFTA does: Wang
et al., MLSys 2021), so a cohort's small students take one forward and one backward pass
instead of one each.

Every convolution of the fused network holds the members' filters side by side and runs as a
grouped convolution (the first one, which sees the shared batch, as one stacked
convolution), every BatchNorm holds each member's channels and statistics, every linear layer
each member's matrix (a batched product). An activation of the fused network is the members'
activations side by side along the channels: ``(B, M·C, ...)``, member ``i`` at channels
``i·C .. (i+1)·C``; parameter-free layers (ReLU, pooling, flattening) act on all at once.

The members keep their own modules: while fused, each member's parameters and buffers are
views of its slice of the fused network's, so the member's optimiser, state dict, checkpoint
and evaluation are those of an unfused student. A network whose layers cannot be fused (a
layer with parameters of another kind, channels mixed across the whole tensor) is refused
by a check of the fused network against the members on a probe batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.models.taps import LOGITS, TapRecorder
from kt_bench.training.device import CPU_VECTOR_CHANNELS, ONEDNN_SAFE_CHANNELS


class NotFusable(KtBenchError):
    """The students cannot be fused (the message says why); they train one by one."""


def _check_input(x: torch.Tensor, per_member: int, members: int, dim: int, what: str) -> bool:
    """Whether ``x`` is the shared (unfused) input of a layer taking ``per_member`` features
    along ``dim``; a :class:`NotFusable` where it is neither that nor the fused input."""
    if x.shape[dim] == per_member:
        return True
    if x.shape[dim] == members * per_member:
        return False
    raise NotFusable(f"{what} got {x.shape[dim]} features along dim {dim}; expected "
                     f"{per_member} (shared) or {members * per_member} (fused)")


class FusedConv2d(nn.Module):
    """The members' ``Conv2d`` layers as one grouped convolution (a stacked one on the shared
    input of a convolution without groups)."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        if c.padding_mode != "zeros":
            raise NotFusable(f"a Conv2d with padding_mode '{c.padding_mode}'")
        self.members = len(convs)
        self.in_channels, self.out_channels, self.groups = c.in_channels, c.out_channels, c.groups
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.kernel_size = c.kernel_size
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in convs]))
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in convs]))
                     if c.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's convolution of its channels of ``x`` (or of the shared ``x``)."""
        groups = self.groups * self.members
        if _check_input(x, self.in_channels, self.members, 1, "a fused Conv2d"):
            if self.groups == 1:  # one stacked convolution of the shared batch
                groups = 1
            else:
                x = x.repeat(1, self.members, 1, 1)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        groups)

    def slices(self) -> dict[str, Callable[[int], slice]]:
        """Member ``i``'s slice of each tensor along its first dimension."""
        n = self.out_channels
        return {"weight": _rows(n), "bias": _rows(n)}


class FusedBatchNorm(nn.Module):
    """The members' BatchNorm layers (1d, 2d or 3d) as one over all their channels, each
    member's running statistics and batch count its own."""

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        b = norms[0]
        if b.momentum is None and b.track_running_stats:
            raise NotFusable("a BatchNorm with momentum=None (a cumulative average)")
        self.members, self.num_features = len(norms), b.num_features
        self.eps, self.momentum = b.eps, b.momentum
        self.track_running_stats = b.track_running_stats
        self.weight = (nn.Parameter(torch.cat([m.weight.detach() for m in norms]))
                       if b.affine else None)
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in norms]))
                     if b.affine else None)
        if b.track_running_stats:
            self.register_buffer("running_mean", torch.cat([m.running_mean for m in norms]))
            self.register_buffer("running_var", torch.cat([m.running_var for m in norms]))
            self.register_buffer("num_batches_tracked",
                                 torch.stack([m.num_batches_tracked for m in norms]))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's BatchNorm of its channels of ``x`` (or of the shared ``x``)."""
        if _check_input(x, self.num_features, self.members, 1, "a fused BatchNorm"):
            x = x.repeat(1, self.members, *[1] * (x.dim() - 2))
        batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            batch_stats, self.momentum or 0.0, self.eps)

    def slices(self) -> dict[str, Callable[[int], slice | int]]:
        """Member ``i``'s slice of each tensor along its first dimension."""
        n = self.num_features
        return {"weight": _rows(n), "bias": _rows(n), "running_mean": _rows(n),
                "running_var": _rows(n), "num_batches_tracked": lambda i: i}


class FusedLinear(nn.Module):
    """The members' ``Linear`` layers as one batched matrix product over each member's
    features (or one stacked product of the shared input)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        lin = linears[0]
        self.members, self.in_features = len(linears), lin.in_features
        self.out_features = lin.out_features
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]))
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in linears]))
                     if lin.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's linear map of its features of ``x`` (B, M·in) -> (B, M·out)."""
        if _check_input(x, self.in_features, self.members, -1, "a fused Linear"):
            return F.linear(x, self.weight, self.bias)
        if x.dim() != 2:
            raise NotFusable(f"a fused Linear got a {x.dim()}-d input; it takes (B, features)")
        m, n = self.members, x.shape[0]
        w = self.weight.view(m, self.out_features, self.in_features)
        out = torch.bmm(x.view(n, m, self.in_features).transpose(0, 1), w.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.view(m, 1, self.out_features)
        return out.transpose(0, 1).reshape(n, m * self.out_features)

    def slices(self) -> dict[str, Callable[[int], slice]]:
        """Member ``i``'s slice of each tensor along its first dimension."""
        n = self.out_features
        return {"weight": _rows(n), "bias": _rows(n)}


def _rows(n: int) -> Callable[[int], slice]:
    return lambda i: slice(i * n, (i + 1) * n)


#: The layer kinds a fused network is built of: the first whose class the layer is an
#: instance of fuses it.
FUSERS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv2d, FusedConv2d),
    (nn.modules.batchnorm._BatchNorm, FusedBatchNorm),
    (nn.Linear, FusedLinear),
)


def _fuser(module: nn.Module) -> type[nn.Module] | None:
    if isinstance(module, nn.SyncBatchNorm):
        return None
    return next((f for kind, f in FUSERS if type(module) is kind or
                 (isinstance(module, kind) and type(module).forward is kind.forward)), None)


def _strip_hooks(model: nn.Module) -> None:
    """Remove every hook a deep copy brought along (the members' tap recorders')."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                      m._forward_hooks_with_kwargs, m._forward_pre_hooks_with_kwargs,
                      m._forward_hooks_always_called):
            hooks.clear()


def split(value: torch.Tensor, members: int, i: int) -> torch.Tensor:
    """Member ``i``'s part of a fused activation ``value`` (its channels, dim 1)."""
    return value.unflatten(1, (members, value.shape[1] // members)).select(1, i)


class _SplitMembers(torch.autograd.Function):
    """A fused activation's members' parts, each a dense tensor of its own, whose gradients
    go back as one tensor in the fused activation's layout (selecting each part by autograd
    would build a zero tensor of the whole activation per member, and in the default layout,
    which slows every backward kernel of a channels-last network after it)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, members: int) -> tuple[torch.Tensor, ...]:
        ctx.members = members
        ctx.shape, ctx.dtype = value.shape, value.dtype
        ctx.format = _layout_of(value)
        return tuple(split(value, members, i).clone(memory_format=ctx.format)
                     for i in range(members))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        whole = torch.empty(ctx.shape, dtype=grads_dtype(grads, ctx.dtype),
                            device=next(g.device for g in grads if g is not None)
                            ).contiguous(memory_format=ctx.format)
        for i, g in enumerate(grads):
            part = split(whole, ctx.members, i)
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return whole, None


def grads_dtype(grads: Sequence[torch.Tensor | None], default: torch.dtype) -> torch.dtype:
    """The dtype of the first gradient given (``default`` where none is)."""
    return next((g.dtype for g in grads if g is not None), default)


def _layout_of(value: torch.Tensor) -> torch.memory_format:
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) \
            and not value.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def split_members(value: torch.Tensor, members: int) -> tuple[torch.Tensor, ...]:
    """Each member's part of a fused activation ``value`` (its channels, dim 1), a tensor of
    its own; gradients flow back into ``value``."""
    if value.shape[1] % members:
        raise NotFusable(f"an activation of {value.shape[1]} channels does not split into "
                         f"{members} students")
    return _SplitMembers.apply(value, members)


class FusedStudents:
    """``students`` (one architecture, each with its own weights) as one fused network whose
    tensors the students' own parameters and buffers view until :meth:`release`.

    :meth:`forward` runs the fused network and gives each member's ``taps`` (canonical names
    of the students' ``tap_map``) and logits as its own network would have them; after the
    backward pass :meth:`share_grads` gives each member's parameters their slice of the fused
    gradients, for the members' optimisers (:meth:`parameters` pairs the fused parameters
    with the members', for one fused optimiser step instead).
    """

    def __init__(self, students: Sequence[nn.Module], taps: Iterable[str],
                 memory_format: torch.memory_format | None = None) -> None:
        if len(students) < 2:
            raise NotFusable("fewer than two students")
        if len({type(s) for s in students}) > 1:
            raise NotFusable("the students are networks of different classes")
        self.members = len(students)
        self.students = list(students)
        self.net = copy.deepcopy(students[0])
        _strip_hooks(self.net)
        self._fused: dict[str, nn.Module] = {}
        self._replace(dict(self.net.named_modules()))
        if memory_format is not None:
            self.net.to(memory_format=memory_format)
        #: Each fused tensor with the members' tensors that view it and the function giving
        #: member ``i``'s slice of it.
        self._tensors = self._pair_tensors()
        self._bind()
        self.transforms = getattr(self.net, "tap_transforms", {})
        self.net.tap_transforms = {}  # the recorder keeps raw values; each member transforms
        self.recorder = TapRecorder(self.net, self.net.tap_map, taps)

    def _replace(self, modules: dict[str, nn.Module]) -> None:
        parts = [dict(s.named_modules()) for s in self.students]
        for name, module in modules.items():
            fuser = _fuser(module)
            if fuser is None:
                own = [n for n, _ in [*module.named_parameters(recurse=False),
                                      *module.named_buffers(recurse=False)]]
                if own:
                    raise NotFusable(f"layer '{name}' ({type(module).__name__}) has "
                                     f"tensors of its own ({', '.join(own)}) and no fused form")
                continue
            fused = fuser([p[name] for p in parts])
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else self.net, attr, fused)
            self._fused[name] = fused

    def _pair_tensors(self) -> list[tuple[torch.Tensor, list[torch.Tensor], Callable]]:
        out = []
        for name, fused in self._fused.items():
            for attr, rows in fused.slices().items():
                whole = getattr(fused, attr)
                if whole is not None:
                    out.append((whole, [getattr(s.get_submodule(name), attr)
                                        for s in self.students], rows))
        return out

    def _bind(self) -> None:
        """Make every member's tensors views of its slice of the fused network's."""
        for whole, own, rows in self._tensors:
            for i, t in enumerate(own):
                t.data = whole.data[rows(i)]

    def release(self) -> None:
        """Give every member tensors of its own again (copies of its current values)."""
        for _, own, _ in self._tensors:
            for t in own:
                t.data = t.data.clone()
        self.recorder.remove()

    def train(self) -> None:
        """The fused network in training mode."""
        self.net.train()

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each member's taps (its tap transforms applied) and logits, as its own network
        would give them, from one pass of the fused network over the shared batch ``x``."""
        logits = self.net(x)
        raw = self.recorder.collect(logits)
        members = [{} for _ in range(self.members)]
        for name, value in raw.items():
            transform = None if name == LOGITS else self.transforms.get(name)
            for own, part in zip(members, split_members(value, self.members), strict=True):
                own[name] = transform(part) if transform else part
        return members

    def parameters(self) -> list[tuple[nn.Parameter, list[nn.Parameter], Callable]]:
        """Each fused parameter with the members' parameters that view it and the function
        giving member ``i``'s slice of it."""
        return [t for t in self._tensors if isinstance(t[0], nn.Parameter)]

    def share_grads(self) -> None:
        """Give each member's parameters their slice of the fused gradients (None where the
        fused tensor got none), and clear the fused ones for the next step."""
        for whole, own, rows in self.parameters():
            grad = whole.grad
            for i, p in enumerate(own):
                p.grad = grad[rows(i)] if grad is not None else None
            whole.grad = None

    def check(self, probe: torch.Tensor, taps: Iterable[str], rtol: float = 1e-3) -> None:
        """A :class:`NotFusable` unless the fused network gives each member's logits and
        ``taps`` on ``probe`` (evaluation mode, float32, no gradients) as the member does."""
        taps = tuple(taps)
        modes = [s.training for s in self.students]
        was = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()
                fused = self.forward(probe)
                for i, student in enumerate(self.students):
                    student.eval()
                    recorder = TapRecorder(student, student.tap_map, taps)
                    try:
                        want = recorder.collect(student(probe))
                    finally:
                        recorder.remove()
                    got = fused[i]
                    for name, value in want.items():
                        if not _close(got[name], value, rtol):
                            raise NotFusable(f"the fused network's '{name}' differs from the "
                                             "students' own (the network mixes channels "
                                             "across the layers kt-bench fuses)")
        except NotFusable:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise NotFusable(f"the fused network failed on a probe batch: {first_line(exc)}"
                             ) from None
        finally:
            self.net.train(was)
            for s, mode in zip(self.students, modes, strict=True):
                s.train(mode)


def check_fusable(students: Sequence[nn.Module], taps: Iterable[str], probe: torch.Tensor,
                  memory_format: torch.memory_format | None = None) -> None:
    """A :class:`NotFusable` unless copies of ``students``, each given weights of its own,
    fuse into a network that gives each copy's logits and ``taps`` on ``probe``
    (:meth:`FusedStudents.check`). A cohort's students start from the same weights, and
    students alike pass the check however a network mixes their channels; the copies differ."""
    copies = []
    for i, student in enumerate(students):
        twin = copy.deepcopy(student)
        _strip_hooks(twin)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in twin.parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                p.add_(noise * (p.std() if p.numel() > 1 else 1.0).clamp_min(1e-3))
        copies.append(twin)
    fused = FusedStudents(copies, taps, memory_format)
    try:
        fused.check(probe, taps)
    finally:
        fused.release()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    scale = b.float().abs().max().clamp_min(1e-6)
    return bool(((a.float() - b.float()).abs().max() <= rtol * scale).item())


def fused_memory_format(students: Sequence[nn.Module], device: torch.device
                        ) -> torch.memory_format:
    """The layout the fused network of ``students`` trains in on ``device``: channels_last,
    but on the CPU where the fused network's BatchNorm is narrower than
    :data:`~kt_bench.training.device.CPU_VECTOR_CHANNELS` channels all told or a strided
    1x1 convolution of a member has fewer than
    :data:`~kt_bench.training.device.ONEDNN_SAFE_CHANNELS` input channels (the cases
    :func:`~kt_bench.training.device.training_memory_format` keeps in the default layout;
    fusing widens the first, not the second)."""
    if device.type != "cpu":
        return torch.channels_last
    m = len(students)
    for module in students[0].modules():
        if isinstance(module, nn.BatchNorm2d) and module.num_features * m < CPU_VECTOR_CHANNELS:
            return torch.contiguous_format
        if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                and module.stride != (1, 1) and module.in_channels < ONEDNN_SAFE_CHANNELS):
            return torch.contiguous_format
    return torch.channels_last
