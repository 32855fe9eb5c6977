"""``cc``: correlation congruence (Peng et al., ICCV 2019), in RepDistiller's form.

The student's and the teacher's pooled features are each mapped by a trainable linear embedding
(128-d by default, no normalisation); the loss couples the embedding differences of consecutive
samples of the batch. Both embeddings train with the student, as in RepDistiller
(R = HobbitLong/RepDistiller: ``Correlation`` in distiller_zoo/CC.py, ``LinearEmbed`` in
models/util.py, both embeddings in ``trainable_list`` in train_student.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kt_bench.api.method import Batch, Method, Shapes, Taps, register_method


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Mean over the B−1 consecutive pairs (i, i+1) of the batch of Σ_d δ_i,d · δ_i+1,d, where
    δ = |e_s − e_t| element-wise, for embeddings of shape (B, D) (R's ``Correlation``).

    ``e_t`` is the output of the teacher's *trainable* embedding, so it is not detached: its
    gradient trains that embedding. Needs B >= 2.
    """
    if e_s.shape != e_t.shape or e_s.dim() != 2:
        raise ValueError(f"cc_loss needs two (B, D) embeddings of one shape, got "
                         f"{tuple(e_s.shape)} and {tuple(e_t.shape)}")
    if e_s.shape[0] < 2:
        raise ValueError(f"cc_loss needs a batch of at least 2 samples, got {e_s.shape[0]}")
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_method("cc")
class CC(Method):
    """Correlation congruence on trainable linear embeddings of the pooled features.

    ``setup`` builds ``embed_s`` and ``embed_t``: ``nn.Linear`` (with bias) from the student's
    and the teacher's ``pool`` width to ``feat_dim`` (R: ``LinearEmbed``, ``--feat_dim`` 128).
    The teacher's pooled feature is detached; its embedding still trains. Default weight 0.02:
    RepDistiller's ``-a 0 -b 0.02`` (scripts/run_cifar_distill.sh).
    """

    default_weight = 0.02

    def __init__(self, weight: float | None = None, feat_dim: int = 128) -> None:
        super().__init__(weight)
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"feat_dim must be an integer >= 1, got {feat_dim}")
        self.feat_dim = int(feat_dim)
        self.taps = ("pool",)
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build the two embeddings from the (B, C) shapes of the ``pool`` taps."""
        self.embed_s = nn.Linear(_width(student_shapes["pool"]), self.feat_dim)
        self.embed_t = nn.Linear(_width(teacher_shapes["pool"]), self.feat_dim)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"cc": cc_loss(embed_s(pool_s), embed_t(pool_t))}``."""
        assert self.embed_s is not None and self.embed_t is not None, "setup() builds them"
        e_s = self.embed_s(student["pool"].flatten(1))
        e_t = self.embed_t(teacher["pool"].detach().flatten(1))
        return {self.name: cc_loss(e_s, e_t)}


def _width(shape: torch.Size) -> int:
    """Features per sample of a (B, ...) shape, as the embedding's flattened input."""
    width = 1
    for n in shape[1:]:
        width *= int(n)
    return width
