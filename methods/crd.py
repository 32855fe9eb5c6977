"""``crd``: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), in
RepDistiller's form (R = HobbitLong/RepDistiller).

The student's and the teacher's pooled features are each mapped by a trainable linear layer to
``feat_dim`` and L2-normalised (R:crd/criterion.py ``Embed``, ``Normalize``). Two memory banks of
N × ``feat_dim`` (N the training set's size) hold a running embedding of every training sample,
one per network (R:crd/memory.py ``ContrastMemory``: ``memory_v1`` the student's, ``memory_v2``
the teacher's). For each sample the student's embedding is scored against the teacher bank's
rows of the sample itself (the positive) and of ``nce_k`` samples of other classes (the
negatives), and the teacher's embedding against the student bank's rows alike: exp(⟨row, v⟩ / T)
divided by a constant Z fixed on the first batch (the mean score times N). Each side's scores
give the NCE loss of :func:`crd_contrast_loss` (R:crd/criterion.py ``ContrastLoss``); the term is
their sum. After scoring, the batch's rows of each bank move towards the new embeddings
(momentum ``nce_m``) and are re-normalised.

Negatives are drawn inside the method (R draws them in its dataset,
R:dataset/cifar100.py ``CIFAR100InstanceSample``): mode ``exact`` takes the sample itself as the
positive, ``relax`` a random sample of its class; both draw the negatives among the samples of
the other classes, without replacement. Every draw is seeded by the step's seed and the
sample's index, so a resumed run, a cohort member and every process of a data-parallel run draw
what a one-process run draws. Beyond R: under data parallelism every process updates its banks
with the whole global batch (gathered), so the banks stay identical on every process; the
banks and the constants are buffers, so they are part of the cell's checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kt_bench.api.method import Batch, Method, Needs, NotApplicable, Shapes, Taps, register_method
from kt_bench.core.seeds import derived_seed

#: Added to every denominator of the NCE loss (R:crd/criterion.py ``eps``).
CRD_EPS = 1e-7

#: Negative-sampling modes (R:train_student.py ``--mode`` choices).
MODES = ("exact", "relax")


def crd_contrast_loss(x: torch.Tensor, n_data: int, eps: float = CRD_EPS) -> torch.Tensor:
    """The NCE loss of one side for normalised scores ``x`` of shape (B, K+1), column 0 the
    positive: −(Σ_b log(x_b0 / (x_b0 + K/N + ε)) + Σ_b Σ_k log((K/N) / (x_bk + K/N + ε))) / B
    with N = ``n_data`` (R's ``ContrastLoss``, Eq. 18 of the paper), computed in float32."""
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"crd_contrast_loss needs scores of shape (B, K+1) with K >= 1, got "
                         f"{tuple(x.shape)}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    x = x.float()
    noise = (x.shape[1] - 1) / n_data
    log_pos = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_neg = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / x.shape[0]


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm (R's ``Normalize(2)``, without an epsilon)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def contrast_scores(bank: torch.Tensor, rows: torch.Tensor, v: torch.Tensor,
                    T: float) -> torch.Tensor:
    """exp(⟨bank[rows[b, j]], v[b]⟩ / T) for every sample b and column j: shape (B, K+1), in
    float32 whatever the autocast (the bank is read, never differentiated)."""
    with torch.autocast(device_type=v.device.type, enabled=False):
        picked = bank.detach().float()[rows.reshape(-1)].view(*rows.shape, bank.shape[1])
        dots = torch.bmm(picked, v.float().unsqueeze(2)).squeeze(2)
        return torch.exp(dots / T)


def momentum_rows(rows: torch.Tensor, v: torch.Tensor, momentum: float) -> torch.Tensor:
    """Bank rows moved towards the embeddings ``v``: (m·rows + (1−m)·v), L2-normalised per row
    (R's ``ContrastMemory`` update)."""
    return l2_normalise(rows * momentum + v.detach().to(rows.dtype) * (1 - momentum))


def largest_nce_k(train_labels: torch.Tensor) -> int:
    """The most negatives every sample can draw without repeating one: N minus the size of the
    largest class (each sample's negatives are the samples of the other classes)."""
    return int(train_labels.numel() - torch.bincount(train_labels).max())


def sample_contrast_indices(train_labels: torch.Tensor, indices: torch.Tensor, k: int, seed: int,
                            mode: str = "exact") -> torch.Tensor:
    """For each sample ``indices[b]``, a row of K+1 training-set indices: the positive, then
    ``k`` distinct samples of other classes, uniformly at random (shape (B, K+1), on the
    labels' device).

    ``mode`` ``exact``: the positive is the sample itself; ``relax``: a uniformly random sample
    of its class (possibly itself), as R's ``CIFAR100InstanceSample``. A sample's row depends
    only on ``seed`` and its own index (not on the rest of the batch or the process).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    if not 1 <= k <= largest_nce_k(train_labels):
        raise ValueError(f"k = {k} negatives are not available; accepted: 1 to "
                         f"{largest_nce_k(train_labels)} for these labels")
    device = train_labels.device
    indices = indices.to(device)
    keys = torch.stack([_uniform_keys(train_labels.numel(), derived_seed(seed, i), device)
                        for i in indices.tolist()])
    same = train_labels[None, :] == train_labels[indices][:, None]
    # the k smallest of i.i.d. uniform keys among the other classes: a uniform k-subset
    negatives = keys.masked_fill(same, 2.0).topk(k, dim=1, largest=False).indices
    if mode == "exact":
        positives = indices
    else:
        positives = keys.masked_fill(~same, 2.0).argmin(dim=1)
    return torch.cat([positives[:, None], negatives], dim=1)


def _uniform_keys(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` uniform [0, 1) keys in float64 (ties negligible) from a generator seeded ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(n, generator=gen, device=device, dtype=torch.float64)


def _world() -> int:
    """The number of processes of the data-parallel run (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` concatenated in rank order (``t`` itself on one process);
    the processes' row counts may differ."""
    world = _world()
    if world == 1:
        return t
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over every process's elements (``x.mean()`` on one process)."""
    if _world() == 1:
        return x.mean()
    total = torch.stack([x.double().sum(), torch.tensor(x.numel(), dtype=torch.float64,
                                                        device=x.device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).to(x.dtype)


class Embed(nn.Module):
    """A linear map (with bias) of the flattened feature to ``dim_out``, L2-normalised per
    sample (R's CRD ``Embed``; the output in float32)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, dim_out), unit rows."""
        return l2_normalise(self.linear(x.flatten(1)).float())


@register_method("crd")
class CRD(Method):
    """Contrastive representation distillation with two memory banks, as RepDistiller.

    Defaults are R's (R:train_student.py): ``feat_dim`` 128, ``nce_k`` 16384 negatives,
    ``nce_t`` 0.07, ``nce_m`` 0.5, ``mode`` exact; weight 0.8 from
    R:scripts/run_cifar_distill.sh (``--distill crd -a 0 -b 0.8``); the pooled feature (R's
    ``feat[-1]``, R:helper/loops.py). Where the training set allows fewer negatives than
    ``nce_k`` (N minus the largest class), that many are used, recorded as ``crd_nce_k``.
    """

    default_weight = 0.8

    def __init__(self, weight: float | None = None, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, mode: str = "exact",
                 tap: str = "pool") -> None:
        super().__init__(weight)
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"feat_dim must be an integer >= 1, got {feat_dim}")
        if int(nce_k) != nce_k or nce_k < 1:
            raise ValueError(f"nce_k must be an integer >= 1, got {nce_k}")
        if not (math.isfinite(nce_t) and nce_t > 0):
            raise ValueError(f"nce_t must be a number > 0, got {nce_t}")
        if not 0 <= nce_m <= 1:
            raise ValueError(f"nce_m must be a number in [0, 1], got {nce_m}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(tap, str) or not tap:
            raise ValueError(f"tap must be a tap name, got {tap!r}")
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m, self.mode = float(nce_t), float(nce_m), mode
        self.tap = tap
        self.needs = Needs(taps=(tap,), indices=True)
        #: The negatives per sample actually drawn (``nce_k``, capped by the training set).
        self.k_used: int | None = None
        self.n_data = 0
        self._labels: torch.Tensor | None = None
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None

    def setup_data(self, labels: torch.Tensor, num_classes: int) -> None:
        """Keep the training labels (negative sampling) and settle the number of negatives."""
        labels = labels.detach().cpu().long()
        available = largest_nce_k(labels) if labels.numel() else 0
        if available < 1:
            raise NotApplicable("crd needs training samples of at least two classes "
                                "(its negatives are samples of other classes)")
        self._labels = labels
        self.n_data = labels.numel()
        self.k_used = min(self.nce_k, available)

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build the two embeddings, then the two banks (uniform in ±1/sqrt(feat_dim/3), as
        R's ``ContrastMemory``) and the normalising constants (−1: not yet fixed)."""
        if self._labels is None:
            raise RuntimeError("crd: setup_data (the training labels) must run before setup")
        self.embed_s = Embed(_width(student_shapes[self.tap]), self.feat_dim)
        self.embed_t = Embed(_width(teacher_shapes[self.tap]), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_v1", "memory_v2"):
            bank = torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv)
            self.register_buffer(name, bank)
        self.register_buffer("z", torch.full((2,), -1.0))

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"crd": NCE loss of the student side + that of the teacher side}``; updates the
        banks with the batch (and fixes Z on the first batch)."""
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("crd: setup() builds the embeddings and banks")
        if batch is None or batch.indices is None:
            raise RuntimeError("crd needs the batch's sample indices (Batch.indices)")
        v1 = self.embed_s(student[self.tap])
        v2 = self.embed_t(teacher[self.tap].detach())
        rows = self.contrast_indices(batch.indices, batch.seed)
        out_v1 = contrast_scores(self.memory_v2, rows, v1, self.nce_t)  # student vs teacher bank
        out_v2 = contrast_scores(self.memory_v1, rows, v2, self.nce_t)  # teacher vs student bank
        z = self._normalisers(out_v1, out_v2)
        loss = (crd_contrast_loss(out_v1 / z[0], self.n_data)
                + crd_contrast_loss(out_v2 / z[1], self.n_data))
        self._update_banks(batch.indices, v1, v2)
        return {self.name: loss}

    def contrast_indices(self, indices: torch.Tensor, seed: int) -> torch.Tensor:
        """The (B, K+1) bank rows the batch's samples are scored against (positive first),
        drawn from ``seed`` (the step's :attr:`Batch.seed`)."""
        labels = self._labels_on(indices.device)
        return sample_contrast_indices(labels, indices, self.k_used, seed, self.mode)

    def facts(self) -> dict[str, Any]:
        """``{"crd_nce_k": the negatives per sample used}`` once the training set is known."""
        return {} if self.k_used is None else {"crd_nce_k": self.k_used}

    def _labels_on(self, device: torch.device) -> torch.Tensor:
        if self._labels.device != device:
            self._labels = self._labels.to(device)
        return self._labels

    @torch.no_grad()
    def _normalisers(self, out_v1: torch.Tensor, out_v2: torch.Tensor) -> torch.Tensor:
        """Z of both sides: fixed on the first batch as the mean score times N (over every
        process's batch), then read from the buffer."""
        if bool((self.z < 0).any()):
            means = torch.stack([_global_mean(out_v1), _global_mean(out_v2)])
            self.z.copy_(means * self.n_data)
        return self.z.clone()

    @torch.no_grad()
    def _update_banks(self, indices: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> None:
        """Momentum update of the rows of every process's samples, in both banks."""
        idx = gather_rows(indices.to(self.memory_v1.device))
        for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            v = gather_rows(v.detach().to(bank.dtype))
            bank.index_copy_(0, idx, momentum_rows(bank[idx], v, self.nce_m))


def _width(shape: torch.Size) -> int:
    """Features per sample of a (B, ...) shape, as the embedding's flattened input."""
    return math.prod(int(n) for n in shape[1:])
