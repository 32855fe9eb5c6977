"""``crd``: the pure functions against loop-level formulas and finite differences, negative
sampling, the banks' update and first-batch normalisation, the cap on the negatives, the loss
of a configured cell (prepared and stepped through the lifecycle) against an independent
re-statement of RepDistiller's (tests/ref_repdistiller_crd.py), and whole runs through the
engine (resume, cohort)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.crd import (
    CRD,
    Embed,
    contrast_scores,
    crd_contrast_loss,
    largest_nce_k,
    momentum_rows,
    sample_contrast_indices,
)
from torch import nn

from kt_bench.api.method import Batch, NotApplicable, build_method, method_config
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train, train_cohort
from kt_bench.training.recipe import Recipe

from ..ref_repdistiller_crd import (
    RCRDLoss,
    REmbed,
    r_class_lists,
    r_sample_idx,
    repdistiller_crd_loss,
)
from ..repdistiller_ref import repdistiller_feats
from .composition import prepare, seeded_models, step_total
from .loops import assert_gradient_matches

#: The grid options that reproduce R's CRD (``-a 0 -b 0.8``) and CRD+KD (``-a 1 -b 0.8``).
GRID_OPTIONS = {"crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                        "nce_m": 0.5, "mode": "exact", "tap": "pool"},
                "kd": {"weight": 1.0, "T": 4.0}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- crd_contrast_loss -----------------------------------------------------------------------

def _nce_loops(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> float:
    rows = x.tolist()
    k = len(rows[0]) - 1
    noise = k / n_data
    total = 0.0
    for row in rows:
        total += math.log(row[0] / (row[0] + noise + eps))
        for value in row[1:]:
            total += math.log(noise / (value + noise + eps))
    return -total / len(rows)


@pytest.mark.parametrize("b,k,n_data", [(2, 1, 3), (3, 4, 50), (5, 7, 1000), (2, 16, 20)])
def test_crd_contrast_loss_is_the_nce_formula(b, k, n_data):
    x = torch.rand(b, k + 1, dtype=torch.float64, generator=_gen(b * k)) * 2 + 1e-3
    got = crd_contrast_loss(x, n_data)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_nce_loops(x, n_data), rel=1e-5)


def test_crd_contrast_loss_by_hand():
    # one sample, K = 1, N = 2: noise 1/2; −(log(1/(1+0.5)) + log(0.5/(3+0.5)))
    x = torch.tensor([[1.0, 3.0]])
    want = -(math.log(1 / 1.5) + math.log(0.5 / 3.5))
    assert crd_contrast_loss(x, 2, eps=0.0).item() == pytest.approx(want, rel=1e-6)


def test_crd_contrast_loss_gradients_match_finite_differences():
    x = torch.rand(3, 5, dtype=torch.float64, generator=_gen(7)) + 0.2
    x.requires_grad_(True)
    crd_contrast_loss(x, 40).backward()
    assert_gradient_matches(x.grad, lambda v: _nce_loops(v, 40), x, 1e-6, rel=1e-4, abs_tol=1e-7)


def test_crd_contrast_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="K >= 1"):
        crd_contrast_loss(torch.rand(3, 1), 10)
    with pytest.raises(ValueError, match="n_data"):
        crd_contrast_loss(torch.rand(3, 2), 0)


# ---- embeddings, scores, bank update ---------------------------------------------------------

def test_embed_is_rs_embed_and_gives_unit_rows():
    torch.manual_seed(1)
    ours = Embed(6, 4)
    ref = REmbed(6, 4)
    ref.load_state_dict(ours.state_dict())  # same layout: linear.weight, linear.bias
    x = torch.randn(3, 6, 1, 1, generator=_gen(2))
    assert torch.allclose(ours(x), ref(x), rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours(x).norm(dim=1), torch.ones(3))


def _scores_loops(bank, rows, v, T) -> list[list[float]]:
    return [[math.exp(sum(bank[r][d] * v[b][d] for d in range(len(v[b]))) / T)
             for r in rows[b]] for b in range(len(rows))]


def test_contrast_scores_are_exp_dot_over_t():
    gen = _gen(3)
    bank = torch.randn(9, 4, dtype=torch.float64, generator=gen) * 0.5
    v = torch.randn(2, 4, dtype=torch.float64, generator=gen) * 0.5
    rows = torch.randint(0, 9, (2, 5), generator=gen)
    got = contrast_scores(bank, rows, v, 0.3)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    want = torch.tensor(_scores_loops(bank.tolist(), rows.tolist(), v.tolist(), 0.3))
    assert torch.allclose(got, want.float(), rtol=1e-5)


def test_momentum_rows_mix_and_renormalise():
    gen = _gen(4)
    rows = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    v = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    got = momentum_rows(rows, v, 0.3)
    for b in range(3):
        mixed = [0.3 * rows[b, d].item() + 0.7 * v[b, d].item() for d in range(5)]
        norm = math.sqrt(sum(m * m for m in mixed))
        assert got[b].tolist() == pytest.approx([m / norm for m in mixed], rel=1e-9)


# ---- negative sampling -----------------------------------------------------------------------

#: Unequal classes: sizes 5, 3, 7, 1 (N = 16; the largest class leaves 9 negatives).
LABELS = torch.tensor([0] * 5 + [1] * 3 + [2] * 7 + [3])


def test_largest_nce_k_is_n_minus_the_largest_class():
    assert largest_nce_k(LABELS) == 9
    assert largest_nce_k(torch.arange(30) % 3) == 20


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_negatives_are_distinct_samples_of_other_classes(mode):
    idx = torch.arange(16)
    rows = sample_contrast_indices(LABELS, idx, 9, seed=5, mode=mode)
    assert rows.shape == (16, 10)
    _, cls_negative = r_class_lists(LABELS, 4)
    for b in range(16):
        own = int(LABELS[b])
        negatives = rows[b, 1:].tolist()
        assert len(set(negatives)) == 9  # without replacement
        assert all(int(LABELS[n]) != own for n in negatives)  # never the sample's own class
        assert set(negatives) <= set(cls_negative[own].tolist())
        if own == 2:  # its pool holds exactly 9 samples: all of them
            assert set(negatives) == set(cls_negative[own].tolist())
        if mode == "exact":
            assert rows[b, 0].item() == b
        else:
            assert int(LABELS[rows[b, 0]]) == own


def test_sampling_is_fixed_by_the_seed_and_the_sample_alone():
    a = sample_contrast_indices(LABELS, torch.tensor([3, 10]), 6, seed=11)
    assert torch.equal(a, sample_contrast_indices(LABELS, torch.tensor([3, 10]), 6, seed=11))
    # the same sample draws the same row whatever else is in the batch (or on other processes)
    b = sample_contrast_indices(LABELS, torch.tensor([5, 3, 12]), 6, seed=11)
    assert torch.equal(a[0], b[1])
    c = sample_contrast_indices(LABELS, torch.tensor([3, 10]), 6, seed=12)
    assert not torch.equal(a, c)


def test_negatives_and_relaxed_positives_are_uniform():
    labels = torch.arange(30) % 3
    neg_counts = torch.zeros(30)
    pos_counts = torch.zeros(30)
    for seed in range(400):
        row = sample_contrast_indices(labels, torch.tensor([0]), 5, seed, "relax")[0]
        neg_counts += torch.bincount(row[1:], minlength=30)
        pos_counts[row[0]] += 1
    others = labels != 0
    # 400 · 5 / 20 = 100 per other-class sample (sd ≈ 8.7); 400 / 10 = 40 per class-0 sample
    assert neg_counts[~others].sum() == 0
    assert neg_counts[others].min() > 60 and neg_counts[others].max() < 140
    assert pos_counts[others].sum() == 0
    assert pos_counts[~others].min() > 15 and pos_counts[~others].max() < 70


def test_rs_sampler_draws_from_the_same_pools_and_repeats_only_past_them():
    """R's sampler (re-stated) draws from the same pools as ours: the samples of the other
    classes, distinct while k fits the pool; past it R repeats negatives, where kt-bench caps
    k (``largest_nce_k``) and refuses more."""
    import numpy as np

    rng = np.random.RandomState(0)
    for index in range(16):
        row = r_sample_idx(LABELS, 4, index, 9, "exact", rng)
        assert row[0] == index and all(LABELS[n] != LABELS[index] for n in row[1:])
        assert len(set(row[1:].tolist())) == 9
    # sample 8 is of class 2 (7 samples): 9 others; R draws 10 of them with repeats
    assert len(set(r_sample_idx(LABELS, 4, 8, 10, "exact", rng)[1:].tolist())) < 10
    with pytest.raises(ValueError):
        sample_contrast_indices(LABELS, torch.tensor([8]), 10, 0)


def test_bad_sampling_arguments_raise():
    with pytest.raises(ValueError, match="accepted: 1 to 9"):
        sample_contrast_indices(LABELS, torch.tensor([0]), 10, 0)
    with pytest.raises(ValueError, match="accepted: exact, relax"):
        sample_contrast_indices(LABELS, torch.tensor([0]), 3, 0, "loose")


# ---- the method: options, cap, first batch, bank update --------------------------------------

def test_defaults_and_options_round_trip():
    assert method_config("crd")["crd"] == {"weight": 0.8, "ce_weight": None, "feat_dim": 128,
                                           "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                                           "mode": "exact", "tap": "pool"}
    method = build_method("crd", method_config("crd", {"crd": {"mode": "relax"}}))
    assert method.taps == ("pool",) and method.mode == "relax"
    combined = build_method("crd+kd", method_config("crd+kd"))
    assert combined.term_weights(0, 240) == {"crd": 0.8, "kd": 1.0}


@pytest.mark.parametrize("options", [
    {"feat_dim": 0}, {"feat_dim": 2.5}, {"nce_k": 0}, {"nce_t": 0.0}, {"nce_t": -1.0},
    {"nce_m": 1.5}, {"nce_m": -0.1}, {"mode": "loose"}, {"tap": ""},
])
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        CRD(**options)


def test_nce_k_is_capped_to_what_the_training_set_allows_and_recorded():
    method = CRD()
    assert method.facts() == {}
    method.setup_data(LABELS, 4)
    assert method.k_used == 9 and method.facts() == {"crd_nce_k": 9}
    small = CRD(nce_k=4)
    small.setup_data(LABELS, 4)
    assert small.facts() == {"crd_nce_k": 4}
    with pytest.raises(NotApplicable, match="two classes"):
        CRD().setup_data(torch.zeros(5, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match="setup_data"):
        CRD().setup({"pool": torch.Size([2, 3])}, {"pool": torch.Size([2, 3])})


def _small_method(nce_k: int = 3, **options) -> CRD:
    torch.manual_seed(0)
    method = CRD(feat_dim=4, nce_k=nce_k, **{"nce_m": 0.3, **options})
    method.setup_data(LABELS, 4)
    method.setup({"pool": torch.Size([2, 5])}, {"pool": torch.Size([2, 6])})
    return method


def _taps(b: int, seed: int) -> tuple[dict, dict]:
    gen = _gen(seed)
    return ({"pool": torch.randn(b, 5, generator=gen)}, {"pool": torch.randn(b, 6, generator=gen)})


def test_banks_are_buffers_initialised_as_rs():
    method = _small_method()
    stdv = 1 / math.sqrt(4 / 3)
    state = method.state_dict()
    for name in ("memory_v1", "memory_v2"):
        bank = state[name]
        assert bank.shape == (16, 4)
        assert bank.min() >= -stdv and bank.max() <= stdv
    assert state["z"].tolist() == [-1.0, -1.0]
    assert not torch.equal(state["memory_v1"], state["memory_v2"])
    assert {n for n, _ in method.named_parameters()} == {
        "embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
        "embed_t.linear.bias"}


def _expected_loss(method: CRD, s: dict, t: dict, idx: torch.Tensor, seed: int,
                   z: tuple[float, float] | None):
    """The loss, Z and the banks after the step from loop-level formulas on the method's
    state before the step."""
    bank1 = method.memory_v1.double().tolist()
    bank2 = method.memory_v2.double().tolist()
    with torch.no_grad():
        v1 = method.embed_s(s["pool"]).double()
        v2 = method.embed_t(t["pool"]).double()
    rows = method.contrast_indices(idx, seed).tolist()
    out_v1 = _scores_loops(bank2, rows, v1.tolist(), method.nce_t)
    out_v2 = _scores_loops(bank1, rows, v2.tolist(), method.nce_t)
    if z is None:
        z = tuple(sum(sum(r) for r in out) / (len(out) * len(out[0])) * 16
                  for out in (out_v1, out_v2))
    loss = sum(_nce_loops(torch.tensor(out, dtype=torch.float64) / zz, 16)
               for out, zz in zip((out_v1, out_v2), z, strict=True))
    new1 = momentum_rows(torch.tensor(bank1, dtype=torch.float64)[idx], v1, method.nce_m)
    new2 = momentum_rows(torch.tensor(bank2, dtype=torch.float64)[idx], v2, method.nce_m)
    return loss, z, new1, new2


def test_first_batch_fixes_z_and_banks_move_towards_the_embeddings():
    method = _small_method()
    idx1, idx2 = torch.tensor([0, 6, 9]), torch.tensor([2, 15])
    s, t = _taps(3, 8)
    before1, before2 = method.memory_v1.clone(), method.memory_v2.clone()
    loss, z, new1, new2 = _expected_loss(method, s, t, idx1, 21, None)
    got = method.loss_terms(s, t, Batch(LABELS[idx1], indices=idx1, seed=21))["crd"]
    assert got.item() == pytest.approx(loss, rel=1e-5)
    assert method.z.tolist() == pytest.approx(list(z), rel=1e-5)
    assert torch.allclose(method.memory_v1[idx1].double(), new1, atol=1e-6)
    assert torch.allclose(method.memory_v2[idx1].double(), new2, atol=1e-6)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[idx1] = False
    assert torch.equal(method.memory_v1[untouched], before1[untouched])
    assert torch.equal(method.memory_v2[untouched], before2[untouched])
    # a second batch keeps Z and is normalised by it
    z_fixed = tuple(method.z.tolist())
    s2, t2 = _taps(2, 9)
    loss2, _, _, _ = _expected_loss(method, s2, t2, idx2, 22, z_fixed)
    got2 = method.loss_terms(s2, t2, Batch(LABELS[idx2], indices=idx2, seed=22))["crd"]
    assert tuple(method.z.tolist()) == z_fixed
    assert got2.item() == pytest.approx(loss2, rel=1e-5)


def test_embeddings_get_gradients_and_the_teacher_feature_none():
    method = _small_method()
    s, t = _taps(3, 10)
    s["pool"].requires_grad_(True)
    t["pool"].requires_grad_(True)
    idx = torch.tensor([1, 7, 12])
    method.loss_terms(s, t, Batch(LABELS[idx], indices=idx, seed=3))["crd"].backward()
    assert t["pool"].grad is None
    assert torch.count_nonzero(s["pool"].grad) > 0
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_the_loss_is_float32_under_bf16_autocast():
    method = _small_method()
    s, t = _taps(3, 12)
    idx = torch.tensor([1, 7, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.loss_terms(s, t, Batch(LABELS[idx], indices=idx, seed=3))["crd"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert method.memory_v1.dtype == torch.float32


def test_the_batch_must_carry_indices():
    method = _small_method()
    s, t = _taps(2, 13)
    with pytest.raises(RuntimeError, match="indices"):
        method.loss_terms(s, t, Batch(LABELS[:2]))


# ---- against RepDistiller's composition ------------------------------------------------------


COMPOSITION_PAIRS = [("resnet56", "resnet20", 1e-5), ("vgg13", "vgg8", 1e-5),
                     ("wrn_40_2", "wrn_16_2", 1e-4)]


@pytest.mark.parametrize("teacher_name,student_name,rel", COMPOSITION_PAIRS)
@pytest.mark.parametrize("spec", ["crd", "crd+kd"])
def test_cell_loss_and_banks_equal_repdistillers(teacher_name, student_name, rel, spec):
    teacher, student, gen = seeded_models(teacher_name, student_name)
    n_data = 20000  # enough for R's 16384 negatives of every class (no cap)
    labels = torch.randint(0, 100, (n_data,), generator=gen)
    idx = torch.randperm(n_data, generator=gen)[:8]
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = labels[idx]

    method = build_method(spec, method_config(spec, GRID_OPTIONS))
    prepare(method, student, teacher, x, labels, 100)
    crd = method if spec == "crd" else method.members[0]
    assert crd.k_used == 16384 and method.facts() == {"crd_nce_k": 16384}
    seed = 1234
    rows = crd.contrast_indices(idx, seed)  # the negatives the step below draws
    assert rows.shape == (8, 16385) and torch.equal(rows[:, 0], idx)

    feat_s, _ = repdistiller_feats(student, x)
    feat_t, _ = repdistiller_feats(teacher, x)
    ref = RCRDLoss(feat_s[-1].shape[1], feat_t[-1].shape[1], n_data)
    ref.embed_s.load_state_dict(crd.embed_s.state_dict())
    ref.embed_t.load_state_dict(crd.embed_t.state_dict())
    ref.contrast.memory_v1.copy_(crd.memory_v1)
    ref.contrast.memory_v2.copy_(crd.memory_v2)

    # the engine's step in epoch 0 of 240
    ours = step_total(method, Recipe(epochs=240), student, teacher, x, y, 0, idx, seed)
    theirs = repdistiller_crd_loss(spec, student, teacher, x, y, idx, rows, ref)
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-6)
    # the banks after the step and the normalising constants
    assert torch.allclose(crd.memory_v1, ref.contrast.memory_v1, rtol=0, atol=2e-6)
    assert torch.allclose(crd.memory_v2, ref.contrast.memory_v2, rtol=0, atol=2e-6)
    assert crd.z.tolist() == pytest.approx(ref.contrast.params[2:4].tolist(), rel=rel)
    # and the student's and the embeddings' gradients
    ours_params = list(student.parameters()) + list(crd.parameters())
    theirs_params = list(student.parameters()) + list(ref.parameters())
    a = torch.cat([g.flatten() for g in torch.autograd.grad(ours, ours_params)])
    b = torch.cat([g.flatten() for g in torch.autograd.grad(theirs, theirs_params)])
    assert ((a - b).norm() / b.norm()).item() < 10 * rel


# ---- through the engine ----------------------------------------------------------------------

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
TEACHER = Spec("resnet8", {"width": 0.5})
STUDENT = Spec("resnet8", {"width": 0.25})
RECIPE = Recipe(epochs=3, batch_size=32, lr=0.05)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    return build_model(TEACHER, data.num_classes, data.in_channels)


def _crd(**options):
    return build_method("crd", method_config("crd", {"crd": {"feat_dim": 16, **options}}))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_crd_run_records_the_capped_k_and_trains_its_banks(data, teacher):
    method = _crd()
    result = train(data, STUDENT, method, RECIPE, 0, make_accelerator("cpu"), teacher)
    # 96 samples in 10 classes of at most 10: 86 negatives at most
    assert result.facts == {"crd_nce_k": 86}
    assert all(math.isfinite(h["crd"]) and h["crd"] > 0 for h in result.history)
    assert (method.z > 0).all()
    # every sample was in a batch: every row of both banks is a unit vector now
    for bank in (method.memory_v1, method.memory_v2):
        assert torch.allclose(bank.norm(dim=1), torch.ones(96), atol=1e-5)


def test_a_killed_crd_run_resumes_exactly(data, teacher, tmp_path):
    acc = make_accelerator("cpu")
    full_method = _crd()
    full = train(data, STUDENT, full_method, RECIPE, 1, acc, teacher)
    ckpt = tmp_path / "ckpt.pt"

    def stop_after_first(history):
        if len(history) == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(data, STUDENT, _crd(), RECIPE, 1, acc, teacher, checkpoint=ckpt,
              on_epoch=stop_after_first)
    resumed_method = _crd()
    resumed = train(data, STUDENT, resumed_method, RECIPE, 1, acc, teacher, checkpoint=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history == full.history
    assert _same_state(resumed.model, full.model)
    assert _same_state(resumed_method, full_method)  # embeddings, banks and Z
    assert resumed.facts == full.facts == {"crd_nce_k": 86}


def test_crd_in_a_cohort_with_kd_equals_the_solo_runs(data, teacher):
    acc = make_accelerator("cpu")
    specs = [("crd", {"feat_dim": 16, "mode": "relax"}), ("kd", {})]
    cohort_methods = [build_method(n, method_config(n, {n: o})) for n, o in specs]
    cohort = train_cohort(data, STUDENT, cohort_methods, RECIPE, 2, acc, teacher)
    for (name, options), got, method in zip(specs, cohort, cohort_methods, strict=True):
        solo_method = build_method(name, method_config(name, {name: options}))
        solo = train(data, STUDENT, solo_method, RECIPE, 2, acc, teacher)
        assert got.error is None and got.history == solo.history, name
        assert _same_state(got.model, solo.model), name
        assert _same_state(method, solo_method), name
        assert got.facts == solo.facts
