"""Horizontal fusion of a cohort's students (kt_bench.training.fusion, fused_cohort): the fused
network gives every member its own taps, gradients and BatchNorm statistics; what cannot be
fused is refused; released members own their tensors; a fused cohort trains as an unfused one
to float rounding, fails members alone, resumes bit for bit, and writes checkpoints a solo
run resumes from."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kt_bench.methods.kd import KD
from torch import nn

from kt_bench.api.method import build_method, register_method
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import MODELS, build_model
from kt_bench.models.taps import LOGITS, TapRecorder
from kt_bench.training import fused_cohort
from kt_bench.training.checkpoints import load_plain
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import DivergedError, train, train_cohort
from kt_bench.training.fusion import FusedStudents, NotFusable
from kt_bench.training.recipe import Recipe

RTOL = 1e-5
FORMATS = [torch.channels_last, torch.contiguous_format]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is tiny: one thread is as fast, and spared the stalls of threads
    waiting on a descheduled sibling on a shared two-core machine (measured: the file takes
    ~20 s alone either way, 4 minutes with two threads beside another busy process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# helpers


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """The norm-relative difference ||got - want|| / ||want|| (absolute where want is 0)."""
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """``got`` has ``want``'s shape and lies within ``rtol`` of it, norm-relative."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= rtol, f"{what}: relative difference {err:.2e} > {rtol:.0e}"


def assert_states_close(got: nn.Module, want: nn.Module, what: str, rtol: float = RTOL) -> None:
    """Every floating-point tensor of the state dicts within ``rtol``; the others equal."""
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys(), what
    for key in a:
        if a[key].is_floating_point():
            assert_close(a[key], b[key], f"{what} {key}", rtol)
        else:
            assert torch.equal(a[key], b[key]), f"{what} {key}: {a[key]} != {b[key]}"


def assert_states_equal(got: dict, want: dict, what: str) -> None:
    """Two state dicts hold the same tensors bit for bit."""
    assert got.keys() == want.keys(), what
    for key in got:
        assert torch.equal(got[key], want[key]), f"{what} {key} differs"


#: Test accuracy (%) of one test sample: fused and unfused weights differ by float rounding,
#: which may move a sample whose top logits nearly tie.
N_TEST = 48
ONE_SAMPLE = 100.0 / N_TEST + 1e-9


def assert_histories_close(got: list[dict], want: list[dict], what: str) -> None:
    """The same epochs and keys; losses and terms within :data:`RTOL`, accuracies within one
    test sample, the rest equal."""
    assert len(got) == len(want), f"{what}: {len(got)} epochs != {len(want)}"
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), f"{what}: {sorted(g)} != {sorted(w)}"
        for key, value in w.items():
            if key in ("top1", "top5"):
                assert abs(g[key] - value) <= ONE_SAMPLE, f"{what} epoch {w['epoch']} {key}"
            elif isinstance(value, float) and key != "lr":
                err = abs(g[key] - value) / max(abs(value), 1e-12)
                assert err <= RTOL, (f"{what} epoch {w['epoch']} {key}: {g[key]!r} vs "
                                     f"{value!r} (relative {err:.2e})")
            else:
                assert g[key] == value, f"{what} epoch {w['epoch']} {key}"


def own_taps(model: nn.Module, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``model``'s logits and ``taps`` on ``x``, from its own forward pass."""
    recorder = TapRecorder(model, model.tap_map, taps)
    try:
        return recorder.collect(model(x))
    finally:
        recorder.remove()


def probe_loss(taps: dict[str, torch.Tensor], labels: torch.Tensor,
               projections: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss touching every tap: cross-entropy of the logits plus a fixed random projection of
    each tap (so each tap's gradient is its own, not one of the logits')."""
    loss = F.cross_entropy(taps[LOGITS], labels)
    for name, value in taps.items():
        if name != LOGITS:
            loss = loss + (value * projections[name]).sum() / value.numel()
    return loss


def projections_for(taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixed random tensor of each tap's shape."""
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) for k, v in taps.items() if k != LOGITS}


def students(spec: Spec, n: int = 3, image_size: int = 32) -> list[nn.Module]:
    """``n`` students of ``spec`` with different random weights (10 classes, RGB)."""
    out = []
    for seed in range(n):
        torch.manual_seed(100 + seed)
        out.append(build_model(spec, 10, 3, image_size))
    return out


# ---------------------------------------------------------------------------------------------
# 1. FusedStudents: each member's taps, gradients and BatchNorm statistics are its own

ZOO = [Spec("resnet8", {"width": 0.5}), Spec("resnet20"), Spec("wrn_16_2"), Spec("vgg8"),
       Spec("mobilenetv2")]  # mobilenetv2: depthwise convolutions (groups == channels)
#: Where a fused value is not within RTOL of the member's own, it must be no further than
#: this many times the member's own float32 value from the float64 one: float32 rounding
#: alone puts some of MobileNetV2's taps 1.2e-5..3e-5, and some BatchNorm weights' gradients
#: 1e-3..1.4e-2, from float64 (measured, fused or not).
ROUNDING_SLACK = 3.0
#: A gradient below this fraction of its member's whole gradient is zero but for rounding (a
#: convolution's bias before a BatchNorm, ~1e-8): norm-relative, it is pure noise.
ZERO_GRAD = 1e-6


def assert_as_own(got: torch.Tensor, own: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """The fused member's ``got`` within :data:`RTOL` of the member's ``own`` (float32, same
    layout), or no further from ``truth`` (the member in float64) than rounding puts ``own``."""
    assert got.shape == own.shape, f"{what}: shape {tuple(got.shape)} != {tuple(own.shape)}"
    err = rel_err(got, own)
    if err <= RTOL:
        return
    fused_err, own_err = rel_err(got, truth), rel_err(own, truth)
    assert fused_err <= ROUNDING_SLACK * max(own_err, RTOL), (
        f"{what}: {err:.2e} from the member's own; {fused_err:.2e} from float64, where the "
        f"member's own is {own_err:.2e}")


def assert_grads_as_own(member: nn.Module, own: nn.Module, truth: nn.Module, what: str) -> None:
    """Each parameter's gradient of the fused ``member`` as its ``own`` copy's (see
    :func:`assert_as_own`); where the float64 ``truth``'s is zero but for rounding, the
    fused one is too."""
    scale = torch.stack([q.grad.norm() for q in truth.parameters()]).norm().item()
    for (name, p), q, t in zip(member.named_parameters(), own.parameters(),
                               truth.parameters(), strict=True):
        assert p.grad is not None, f"{what} {name} got no gradient"
        if t.grad.norm().item() <= ZERO_GRAD * scale:
            assert p.grad.norm().item() <= ZERO_GRAD * scale, \
                f"{what} {name}: gradient {p.grad.norm().item():.1e}, where it should be 0"
        else:
            assert_as_own(p.grad, q.grad, t.grad, f"{what} grad {name}")


def assert_buffers_as_own(member: nn.Module, own: nn.Module, truth: nn.Module, what: str
                          ) -> None:
    """Every buffer (BatchNorm statistics, batch counts) of the fused ``member`` as its
    ``own`` copy's."""
    for (name, b), c, t in zip(member.named_buffers(), own.buffers(), truth.buffers(),
                               strict=True):
        if b.is_floating_point():
            assert_as_own(b, c, t, f"{what} {name}")
        else:
            assert torch.equal(b, c), f"{what} {name}: {b} != {c}"


@pytest.mark.parametrize("memory_format", FORMATS, ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("spec", ZOO, ids=[s.name for s in ZOO])
def test_fused_zoo_students_give_each_member_its_own_taps_grads_and_statistics(
        spec, memory_format):
    """Each member is compared with its own copy run in the fused network's layout: in
    float32 on this CPU the layouts alone differ by up to 1e-2 in some BatchNorm biases'
    gradients of resnet20 (channels-last reductions; measured against float64, with or
    without fusion), which is no property of fusion."""
    assert spec.name in MODELS, f"zoo model {spec.name} is not registered"
    members = students(spec)
    owns = [copy.deepcopy(s).to(memory_format=memory_format).train() for s in members]
    truths = [copy.deepcopy(s).double().train() for s in members]
    taps = tuple(members[0].tap_map)
    fused = FusedStudents(members, taps, memory_format)
    fused.train()
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (6,))

    got = fused.forward(x)
    want = [own_taps(r, x, taps) for r in owns]
    true = [own_taps(t, x.double(), taps) for t in truths]
    projections = projections_for(want[0])
    for i in range(len(members)):
        assert got[i].keys() == want[i].keys()
        for name in want[i]:
            assert_as_own(got[i][name], want[i][name], true[i][name], f"member {i} {name}")
    sum(probe_loss(t, labels, projections) for t in got).backward()
    fused.share_grads()
    for w, t in zip(want, true, strict=True):
        probe_loss(w, labels, projections).backward()
        probe_loss(t, labels, {k: v.double() for k, v in projections.items()}).backward()
    for i, (member, own, truth) in enumerate(zip(members, owns, truths, strict=True)):
        assert_grads_as_own(member, own, truth, f"member {i}")
        assert_buffers_as_own(member, own, truth, f"member {i} after a train-mode forward")

    fused.net.eval()
    with torch.no_grad():
        got = fused.forward(x)
        for i, (own, truth) in enumerate(zip(owns, truths, strict=True)):
            want, true = own_taps(own.eval(), x, taps), own_taps(truth.eval(), x.double(), taps)
            for name in want:
                assert_as_own(got[i][name], want[name], true[name], f"eval member {i} {name}")
    fused.release()


def test_share_grads_clears_the_fused_gradients_for_the_next_step():
    members = students(Spec("resnet8", {"width": 0.5}), n=2)
    fused = FusedStudents(members, ("stage1",), torch.contiguous_format)
    fused.train()
    out = fused.forward(torch.randn(4, 3, 32, 32))
    sum(o[LOGITS].square().mean() for o in out).backward()
    fused.share_grads()
    assert all(p.grad is None for p in fused.net.parameters())
    assert all(p.grad is not None for m in members for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# 2. check() refuses what cannot be fused


class TinyNet(nn.Module):
    """conv -> ``middle`` -> ReLU -> pool -> linear, with taps ``stage1`` (after ``middle``)
    and ``pool``; ``middle`` may be any module, ``mix`` a function applied after it."""

    def __init__(self, middle: nn.Module | None = None,
                 mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = middle if middle is not None else nn.BatchNorm2d(8)
        self.mix = mix
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 5)
        self.tap_map = {"stage1": "middle", "pool": "pool"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits."""
        h = self.middle(self.conv(x))
        if self.mix is not None:
            h = self.mix(h)
        return self.fc(self.pool(F.relu(self.conv2(F.relu(h)))))


def tiny_students(n: int = 3, **kwargs) -> list[TinyNet]:
    """``n`` :class:`TinyNet` of different random weights."""
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(TinyNet(**kwargs))
    return out


def test_a_tiny_net_of_fusable_layers_passes_the_check():
    """The positive control of the refusals below: the same net with a BatchNorm fuses."""
    fused = FusedStudents(tiny_students(), ("stage1", "pool"))
    fused.check(torch.randn(4, 3, 8, 8), ("stage1", "pool"))
    fused.release()


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.LayerNorm([8, 8, 8])],
                         ids=["GroupNorm", "LayerNorm"])
def test_a_norm_layer_with_weights_of_no_fused_form_is_refused_by_name(norm):
    with pytest.raises(NotFusable, match=r"layer 'middle' \((GroupNorm|LayerNorm)\).*weight"):
        FusedStudents(tiny_students(middle=norm), ("stage1",))


def test_a_parameter_free_norm_over_all_channels_is_refused_by_the_check():
    """A GroupNorm without weights has no tensors to refuse it by, but on the fused tensor it
    would normalise over every member's channels at once: the probe must catch it."""
    members = tiny_students(middle=nn.GroupNorm(1, 8, affine=False))
    fused = FusedStudents(members, ("stage1",))
    with pytest.raises(NotFusable, match="differs from the students' own"):
        fused.check(torch.randn(4, 3, 8, 8), ("stage1",))


def test_a_network_that_mixes_channels_across_the_tensor_is_refused_by_the_check():
    members = tiny_students(mix=lambda h: h.flip(1))  # reverses the members' order too
    x = torch.randn(4, 3, 8, 8)
    fused = FusedStudents(members, ("pool",))
    fused.net.eval()
    with torch.no_grad():
        got = fused.forward(x)
        wrong = [rel_err(got[i][LOGITS], own_taps(m.eval(), x, ())[LOGITS])
                 for i, m in enumerate(members)]
    assert max(wrong) > 1e-2, f"the flip should put other members' channels in: {wrong}"
    with pytest.raises(NotFusable, match="differs from the students' own"):
        fused.check(x, ("pool",))


def test_a_network_that_concatenates_its_activation_with_itself_is_refused():
    """cat([h, h]) of the fused (B, M·C) tensor lays out all members twice, not each member
    twice: the next fused convolution's groups then read the wrong channels."""

    class Doubling(TinyNet):
        """TinyNet whose second convolution reads the first one's output twice."""

        def __init__(self) -> None:
            super().__init__()
            self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """The logits."""
            h = F.relu(self.middle(self.conv(x)))
            return self.fc(self.pool(F.relu(self.conv2(torch.cat([h, h.flip(1)], 1)))))

    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(Doubling())
    fused = FusedStudents(members, ("pool",))
    with pytest.raises(NotFusable, match="differs from the students' own"):
        fused.check(torch.randn(4, 3, 8, 8), ("pool",))


@pytest.mark.parametrize("name", ["shufflev1", "shufflev2"])
def test_zoo_shufflenets_are_refused(name):
    """ShuffleNet's channel shuffle interleaves channels across the whole tensor (and v2
    splits it in halves), so fused it mixes the members: measured refused by the check (if a
    future fusion learns to shuffle per member, this test should flip to an equivalence
    check)."""
    if name not in MODELS:
        pytest.skip(f"{name} is not registered")
    members = students(Spec(name), n=2)
    fused = FusedStudents(members, ("stage1", "stage2"))
    with pytest.raises(NotFusable, match="differs from the students' own"):
        fused.check(torch.randn(2, 3, 32, 32), ("stage1", "stage2"))


def test_fewer_than_two_or_mixed_students_are_refused():
    with pytest.raises(NotFusable, match="fewer than two"):
        FusedStudents(tiny_students(n=1), ())
    mixed = [TinyNet(), build_model(Spec("resnet8", {"width": 0.5}), 10)]
    with pytest.raises(NotFusable, match="different classes"):
        FusedStudents(mixed, ())


# ---------------------------------------------------------------------------------------------
# 3. release(): the members own their tensors again


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds ``t`` and nothing else."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("memory_format", FORMATS, ids=["channels_last", "contiguous"])
def test_release_gives_each_member_its_own_storage_and_values(memory_format):
    members = students(Spec("resnet8", {"width": 0.5}))
    fused = FusedStudents(members, ("stage2",), memory_format)
    fused.train()
    fused.forward(torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format))
    tensors = [[*m.parameters(), *m.buffers()] for m in members]
    assert not any(owns_storage(t) for ts in tensors for t in ts), "members should be views"
    before = [[t.detach().clone() for t in ts] for ts in tensors]

    fused.release()
    for i, (ts, old) in enumerate(zip(tensors, before, strict=True)):
        for t, o in zip(ts, old, strict=True):
            assert owns_storage(t), f"member {i} still views a larger storage"
            assert torch.equal(t, o), f"member {i} lost its values"
    with torch.no_grad():  # the fused network moves on; the members do not
        for t in [*fused.net.parameters(), *fused.net.buffers()]:
            t.add_(1)
    fused.net.train()(torch.randn(4, 3, 32, 32))
    for i, (ts, old) in enumerate(zip(tensors, before, strict=True)):
        assert all(torch.equal(t, o) for t, o in zip(ts, old, strict=True)), \
            f"member {i} changed with the fused network after release"


# ---------------------------------------------------------------------------------------------
# 4-7. The engine: fused cohorts against unfused ones

DATA = Spec("synthetic", {"n_train": 96, "n_test": N_TEST, "image_size": 8, "noise": 2.0,
                          "augment": True})
STUDENT = Spec("resnet8", {"width": 0.25})
TEACHER = Spec("resnet8", {"width": 0.5})
#: Three steps per epoch, and one step per epoch (one batch holds the training set).
STEPS3 = Recipe(epochs=1, batch_size=32, lr=0.05)
STEP1 = Recipe(epochs=1, batch_size=96, lr=0.05)
TWO_EPOCHS = Recipe(epochs=2, batch_size=32, lr=0.05)
DEMO = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss", "kd+nst_poly"]
ALL = [*DEMO, "crd", "vid"]  # crd: sample indices and memory banks; vid: its own connectors


@pytest.fixture(scope="module")
def data():
    """96 synthetic training images of 8x8 (three batches of 32), 48 test images."""
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher(data):
    """An untrained teacher: the methods only need its taps to be fixed."""
    torch.manual_seed(1)
    return build_model(TEACHER, data.num_classes, data.in_channels, data.image_size).eval()


@pytest.fixture
def fused_steps(monkeypatch):
    """A list that gets the number of members of every fused step taken (so a test can tell
    that its cohort really trained fused)."""
    taken: list[int] = []
    step = fused_cohort.FusedGroup.step

    def counting(self, *args, **kwargs):
        taken.append(sum(p.member.error is None for p in self.planned))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(fused_cohort.FusedGroup, "step", counting)
    return taken


def cohort(data, teacher, names, recipe, fuse, seed=0, log=None, **kwargs):
    """``train_cohort`` of ``names`` on the CPU in float32."""
    return train_cohort(data, STUDENT, [build_method(n) for n in names], recipe, seed,
                        make_accelerator("cpu", "no"), teacher, fuse=fuse,
                        log=log if log is not None else _no_log, **kwargs)


def _no_log(line: str) -> None:
    raise AssertionError(f"fusion was refused or ended: {line}")


def test_a_fused_cohort_tracks_the_unfused_one_over_an_epoch_of_three_steps(
        data, teacher, fused_steps):
    """Measured (CPU, fp32): per-epoch losses and terms agree to < 3e-7 relative; the
    weights after three steps agree to ~1e-6, but NST's (nst_*) to 2e-5..6e-5, as they do
    between two unfused runs whose teacher differs by 1e-7 relative: NST amplifies rounding.
    So the weights are compared after one step (next test); here the records."""
    fused = cohort(data, teacher, ALL, STEPS3, fuse=True)
    plain = cohort(data, teacher, ALL, STEPS3, fuse=False)
    assert fused_steps == [len(ALL)] * 3, "the cohort did not train fused"
    for name, f, p in zip(ALL, fused, plain, strict=True):
        assert f.error is None and p.error is None, (name, f.error, p.error)
        assert (f.fused_steps, p.fused_steps) == (3, 0), name
        assert_histories_close(f.history, p.history, name)


def test_a_fused_step_updates_every_student_as_its_own_step_does(data, teacher, fused_steps):
    """One step (a batch holds the training set): measured weights within ~1e-6 relative."""
    fused = cohort(data, teacher, ALL, STEP1, fuse=True)
    plain = cohort(data, teacher, ALL, STEP1, fuse=False)
    assert fused_steps == [len(ALL)], "the cohort did not train fused"
    for name, f, p in zip(ALL, fused, plain, strict=True):
        assert f.error is None and p.error is None, (name, f.error, p.error)
        assert_histories_close(f.history, p.history, name)
        assert_states_close(f.model, p.model, name)
        # the cohort released the fused network: each student owns its tensors again
        assert all(owns_storage(t) for t in f.model.state_dict().values()), name


def test_a_cohort_that_cannot_fuse_trains_unfused_bit_for_bit(data, teacher, fused_steps):
    one = cohort(data, teacher, ["kd"], STEPS3, fuse=True)
    assert fused_steps == [] and one[0].error is None and one[0].fused_steps == 0
    alone = cohort(data, teacher, ["kd"], STEPS3, fuse=False)
    assert one[0].history == alone[0].history
    assert_states_equal(one[0].model.state_dict(), alone[0].model.state_dict(), "kd alone")


@pytest.mark.parametrize("name", ["shufflev1", "shufflev2"])
def test_a_shufflenet_cohort_is_refused_or_trains_as_unfused(data, teacher, fused_steps, name):
    """ShuffleNets mix channels across the fused tensor (refused above, for students of
    different weights). A cohort's students all start from the same weights, on which the
    probe cannot see the mixing; measured: shufflev1 is refused all the same (its shuffle of 3
    groups moves channels even between identical members), shufflev2 is not, and then trains
    wrong (weights ~2x apart from unfused after three steps)."""
    lines: list[str] = []
    names = ["student", "kd"]
    acc = make_accelerator("cpu", "no")
    fused = train_cohort(data, Spec(name), [build_method(n) for n in names], STEPS3, 0, acc,
                         teacher, fuse=True, log=lines.append)
    plain = train_cohort(data, Spec(name), [build_method(n) for n in names], STEPS3, 0, acc,
                         teacher)
    refused = any("cannot be fused" in line for line in lines)
    assert refused == (fused_steps == []), (lines, fused_steps)
    for n, f, p in zip(names, fused, plain, strict=True):
        assert f.error is None and p.error is None, (n, f.error, p.error)
        if refused:  # the students trained one by one, exactly as unfused
            assert f.history == p.history, n
            assert_states_equal(f.model.state_dict(), p.model.state_dict(), n)
            continue
        what = (f"{name} {n}: BUG: trained fused although it mixes channels across members "
                f"(FusedGroup's probe check compares identical students)")
        assert_states_close(f.model, p.model, what)
        assert_histories_close(f.history, p.history, what)


# ---------------------------------------------------------------------------------------------
# 5. A member that fails leaves the fused group alone


def register_failing_methods() -> None:
    """``boom3`` (KD whose terms raise in its third step) and ``nan_kd`` (KD whose loss is
    NaN from the first step), in the test's isolated registry."""

    @register_method("boom3")
    class Boom3(KD):
        """KD that raises in its third step."""

        def loss_terms(self, student, teacher, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                raise RuntimeError("boom in step 3")
            return super().loss_terms(student, teacher, batch)

    @register_method("nan_kd")
    class NaNKD(KD):
        """KD whose loss is NaN."""

        def loss_terms(self, student, teacher, batch):
            return {self.name: student["logits"].sum() * float("nan")}


@pytest.fixture(scope="module")
def healthy_fused(data, teacher):
    """A fused cohort of student, kd and at over two epochs of three steps."""
    return cohort(data, teacher, ["student", "kd", "at"], TWO_EPOCHS, fuse=True)


@pytest.mark.parametrize("bad, error", [("boom3", RuntimeError), ("nan_kd", DivergedError)])
def test_a_failing_member_leaves_the_others_as_a_fused_cohort_without_it(
        data, teacher, healthy_fused, fused_steps, bad, error):
    register_failing_methods()
    names = ["student", "kd", bad, "at"]
    results = cohort(data, teacher, names, TWO_EPOCHS, fuse=True)
    # boom3 steps twice, then its group of four fails it in step 3 and the next is rebuilt;
    # nan_kd diverges in epoch 1 (its epoch ends with it) and leaves the group for epoch 2
    assert fused_steps == [4, 4, 4, 3, 3, 3], fused_steps
    failed = results[2]
    assert isinstance(failed.error, error), failed.error
    assert failed.history == []
    if bad == "boom3":
        assert "boom in step 3" in str(failed.error)
    else:
        assert "loss became nan in epoch 1" in str(failed.error)
    for name, got, want in zip(["student", "kd", "at"], [results[i] for i in (0, 1, 3)],
                               healthy_fused, strict=True):
        assert got.error is None, (name, got.error)
        assert_histories_close(got.history, want.history, f"{name} beside {bad}")
        assert_states_close(got.model, want.model, f"{name} beside {bad}")


# ---------------------------------------------------------------------------------------------
# 6-7. Checkpoints of a fused cohort

RESUMED = ["student", "kd", "crd", "vid"]


def fused_with_checkpoints(data, teacher, folder: Path, stop_after_epoch: int | None = None):
    """A fused cohort of :data:`RESUMED` over :data:`TWO_EPOCHS`, checkpointed in ``folder``;
    with ``stop_after_epoch``, Ctrl-C right after that epoch's last checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = [folder / f"{n}.pt" for n in RESUMED]

    def last_member_done(history: list[dict]) -> None:
        if len(history) == stop_after_epoch:
            raise KeyboardInterrupt

    on_epoch = [None] * (len(RESUMED) - 1) + [last_member_done]
    return cohort(data, teacher, RESUMED, TWO_EPOCHS, fuse=True, checkpoints=checkpoints,
                  on_epoch=on_epoch)


@pytest.fixture(scope="module")
def uninterrupted(data, teacher, tmp_path_factory):
    """The results and checkpoint folder of an uninterrupted fused run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return fused_with_checkpoints(data, teacher, folder), folder


@pytest.fixture(scope="module")
def interrupted(data, teacher, tmp_path_factory):
    """The checkpoint folder of a fused run stopped (Ctrl-C) after its first epoch."""
    folder = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(KeyboardInterrupt):
        fused_with_checkpoints(data, teacher, folder, stop_after_epoch=1)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A private copy of a fixture's checkpoint folder."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_a_fused_cohort_resumes_bit_for_bit(data, teacher, uninterrupted, interrupted,
                                            tmp_path):
    full, full_folder = uninterrupted
    folder = copy_of(interrupted, tmp_path)
    for name in RESUMED:
        assert len(load_plain(folder / f"{name}.pt")["history"]) == 1, name
    resumed = fused_with_checkpoints(data, teacher, folder)
    for name, r, f in zip(RESUMED, resumed, full, strict=True):
        assert r.error is None and len(r.history) == 2, (name, r.error)
        assert r.history == f.history, name
        assert_states_equal(r.model.state_dict(), f.model.state_dict(), name)
        # the method's state (crd's memory banks, vid's connectors) and the optimiser's too
        got, want = load_plain(folder / f"{name}.pt"), load_plain(full_folder / f"{name}.pt")
        assert_states_equal(got["trainee"], want["trainee"], f"{name} checkpoint")
        for g, w in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(),
                        strict=True):
            assert_states_equal(g, w, f"{name} optimizer state")


def test_a_fused_members_checkpoint_resumes_a_solo_run_and_holds_no_fused_storage(
        data, teacher, uninterrupted, interrupted, tmp_path):
    full, _ = uninterrupted
    folder = copy_of(interrupted, tmp_path)
    acc = make_accelerator("cpu", "no")
    for i, name in enumerate(RESUMED):
        ckpt = folder / f"{name}.pt"
        fused_size = ckpt.stat().st_size
        first = load_plain(ckpt)["history"]
        solo = train(data, STUDENT, build_method(name), TWO_EPOCHS, 0, acc, teacher,
                     checkpoint=ckpt)
        assert solo.fused_steps == 0 and len(solo.history) == 2, name
        assert solo.history[0] == first[0], name
        # the solo run's second epoch is the fused run's, to float rounding
        assert_histories_close(solo.history, full[i].history, f"solo {name} resumed")

        # a run that never fused writes checkpoints of the same contents (one epoch fewer)
        own = tmp_path / f"solo-{name}.pt"
        train(data, STUDENT, build_method(name), STEP1, 0, acc, teacher, checkpoint=own)
        assert fused_size <= 1.5 * own.stat().st_size, (
            f"{name}: the fused member's checkpoint ({fused_size} B) is far bigger than a "
            f"solo one ({own.stat().st_size} B): it holds the fused network's storage")
