"""What the tests of ``ab``, ``ft`` and ``fsp`` share: the grid's options, finite differences,
both stages of one batch against an independent re-statement of RepDistiller's
(tests/ref_repdistiller_init.py), and the initialisation stage through the engine (it runs
first, trains what it should, resumes from a kill inside either stage);
:class:`InitialisationStageTests` holds the tests all three run alike."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate.utils import set_seed
from torch import nn

from kt_bench.api.method import INIT, MAIN, Method, build_method, method_config
from kt_bench.core.options import Spec
from kt_bench.core.seeds import derived_seed
from kt_bench.data import load_dataset
from kt_bench.data.bundle import DataBundle
from kt_bench.models import build_model
from kt_bench.training import engine
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import _sgd, train
from kt_bench.training.lifecycle import Trainee, base_ce_weight, plan_epoch, step_loss
from kt_bench.training.recipe import Recipe

from ..fixtures import central_differences
from ..ref_repdistiller_init import (
    make_r_modules,
    r_init_lr,
    r_init_modules,
    r_learning_rate,
    r_sgd,
    r_trainable_modules,
    repdistiller_init_loss,
    repdistiller_main_loss,
)
from .composition import prepare, read_teacher, seeded_models

#: R's --distill name of each kt-bench method.
R_NAMES = {"ab": "abound", "ft": "factor", "fsp": "fsp"}

#: The crd-cifar100 grid's options (``[method_options.<name>]``) ...
GRID_OPTIONS = {
    "ab": {"weight": 1.0, "layers": ["stage1_pre", "stage2_pre", "stage3_pre"], "margin": 1.0,
           "init_epochs": 30},
    "ft": {"weight": 200.0, "tap": "stage3", "rate": 0.5, "init_epochs": 30, "init_lr": 0.01},
    "fsp": {"weight": 1.0, "layers": ["stage0", "stage1", "stage2", "stage3"],
            "init_epochs": 30},
}
#: ... and the VGG pair's overrides: four stages, the last one stage4, R's FT init lr 0.05.
VGG_OVERRIDES = {
    "ab": {"layers": ["stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre"]},
    "ft": {"tap": "stage4", "init_lr": 0.05},
    "fsp": {"layers": ["stage0", "stage1", "stage2", "stage3", "stage4"]},
}


def grid_options(name: str, pair: tuple[str, str]) -> dict:
    """The options the crd-cifar100 grid gives ``name`` for ``pair`` (teacher, student)."""
    options = dict(GRID_OPTIONS[name])
    if pair[0].startswith("vgg"):
        options.update(VGG_OVERRIDES[name])
    return options


def check_gradient(fn, x: torch.Tensor, step: float = 1e-6, rel: float = 1e-6,
                   every: int = 1) -> None:
    """Autograd's gradient of ``fn`` at float64 ``x`` against central differences."""
    v = x.detach().clone().requires_grad_(True)
    fn(v).backward()
    for i, num in central_differences(lambda u: fn(u).detach(), x, step, every).items():
        assert v.grad.flatten()[i].item() == pytest.approx(num, rel=rel, abs=1e-9), i


def check_stage_weights(method: Method, init: dict[str, float], main: dict[str, float]) -> None:
    """``method`` weighs its terms ``init`` in the first epoch of a 30-epoch initialisation
    stage, and ``main`` in the first of 240 main-stage epochs."""
    assert method.init_term_weights(0, 30) == init
    assert method.term_weights(0, 240) == main


def pool_loops(f: torch.Tensor, h: int) -> list:
    """Average pooling of (B, C, H, H) to (h, h) by equal blocks, as nested lists."""
    b, c, big = f.shape[0], f.shape[1], f.shape[2]
    k = big // h
    return [[[[sum(f[n, ch, y * k + i, x * k + j].item() for i in range(k) for j in range(k))
               / (k * k) for x in range(h)] for y in range(h)] for ch in range(c)]
            for n in range(b)]


# ---- both stages against R's -----------------------------------------------------------------

def calibrate_batchnorm(model: nn.Module, g: torch.Generator) -> None:
    """Random affine BN parameters, and running statistics from random images (cumulative
    averages), so eval-mode activations keep a trained network's scale (with arbitrary ones a
    deep ResNet's features reach ~1e5 and one step of FT's autoencoder diverges)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None
        model.train()(torch.randn(16, 3, 32, 32, generator=g))
    for m in bns:
        m.momentum = 0.1


def _state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().double() for k, v in module.state_dict().items()}


def _same_moves(ours_before, ours_after, r_before, r_after, what: str,
                expected_unequal: frozenset = frozenset()) -> None:
    """Every tensor moved as R's did: not at all where R's did not move, else by the same step
    up to rounding (the cross-entropy is computed in float32): 1e-5 of its own step, plus 1e-7
    of the whole step of the part for tensors whose gradient is rounding noise (a conv bias
    before a train-mode BN)."""
    assert ours_after.keys() == r_after.keys(), what
    moves = {k: (ours_after[k] - ours_before[k], r_after[k] - r_before[k]) for k in ours_after
             if k not in expected_unequal}
    whole = math.sqrt(sum(ref.norm().item() ** 2 for _, ref in moves.values()))
    for k, (ours, ref) in moves.items():
        if ref.norm() == 0:
            assert ours.norm() == 0, (what, k, "moved; R's did not")
        else:
            err = (ours - ref).norm().item()
            assert err <= 1e-5 * ref.norm().item() + 1e-7 * whole, (what, k, err, whole)


class Stage:
    """kt-bench's side of one step of either stage, as the engine runs it: the lifecycle's
    plan and step loss, the engine's optimisers (the main stage's and the initialisation
    stage's own at a constant rate) and the modes it sets for the stage."""

    def __init__(self, method: Method, student: nn.Module, teacher: nn.Module,
                 recipe: Recipe) -> None:
        self.method, self.teacher, self.recipe = method, teacher, recipe
        self.trainee = Trainee(student, method)
        self.base_ce = base_ce_weight(method, recipe.ce_weight)
        self.optimizers = {
            MAIN: _sgd(self.trainee, recipe, recipe.lr),
            INIT: _sgd(self.trainee, recipe, method.needs.init.lr or recipe.lr)}

    def step(self, stage: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(loss, lr) of one step in the first epoch of ``stage``."""
        epoch = 0 if stage == INIT else self.method.needs.init_epochs
        plan = plan_epoch(self.method, epoch, self.recipe.epochs, self.base_ce)
        assert plan.stage == stage
        optimizer = self.optimizers[stage]
        self.trainee.train()
        if stage == INIT and not self.method.needs.init.trains_student:
            self.trainee.student.eval()
        t_taps = read_teacher(self.method, self.teacher, x)
        loss = step_loss(self.trainee, x, plan.batch(y), t_taps, plan).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), optimizer.param_groups[0]["lr"]


#: The one way kt-bench's FSP differs from R's on a WRN student: R's initialisation stage puts
#: only get_feat_modules() in train mode, so the final BN (unused by FSP) keeps its running
#: statistics there; kt-bench's student trains whole, and those statistics move (so the main
#: stage's momentum update moves them differently too).
KNOWN = {("fsp", "wrn_16_2"): frozenset({"bn.running_mean", "bn.running_var",
                                         "bn.num_batches_tracked"})}


def _method_modules(name: str, method) -> dict[str, nn.Module]:
    if name == "ab":
        return {"connector": method.connectors}
    if name == "ft":
        return {"paraphraser": method.paraphraser, "translator": method.translator}
    return {}


def check_both_stages_equal_rs(name: str, teacher_name: str, student_name: str) -> None:
    """One batch of the initialisation stage, then one of the main stage: kt-bench's loss
    equals R's, and its optimiser moves exactly what R's moves, by the same step.

    In float64: in float32, one SGD step can leave a state whose gradients are ill-conditioned
    (seen: WRN's conv1 after FSP's step, float32 vs float64 1.5e-3 apart for one of two states
    1e-6 apart), which would hide nothing but fail on rounding."""
    distill = R_NAMES[name]
    teacher, student, g = seeded_models(teacher_name, student_name, calibrate_batchnorm)
    teacher, student = teacher.double(), student.double()
    r_teacher, r_student = copy.deepcopy(teacher), copy.deepcopy(student)
    x = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 100, (8,), generator=g)

    options = grid_options(name, (teacher_name, student_name))
    method = build_method(name, method_config(name, {name: options}))
    prepare(method, student, teacher, x)
    method.double()
    r_modules = make_r_modules(distill, r_student, r_teacher, x).double()
    ours_modules = _method_modules(name, method)
    for key, module in ours_modules.items():
        target = r_modules[key].connectors if key == "connector" else r_modules[key]
        target.load_state_dict(module.state_dict())  # fails unless the layers line up

    recipe = Recipe(epochs=240, lr=0.05, schedule="multistep", milestones=(150, 180, 210))
    ours = Stage(method, student, teacher, recipe)
    known = KNOWN.get((name, student_name), frozenset())

    def snapshot():
        # R's Connector holds its ModuleList as ``connectors``
        return ({"student": _state(student),
                 **{k: _state(m, "connectors." if k == "connector" else "")
                    for k, m in ours_modules.items()}},
                {"student": _state(r_student),
                 **{k: _state(r_modules[k]) for k in ours_modules}})

    for stage in (INIT, MAIN):
        before = snapshot()
        loss, lr = ours.step(stage, x, y)
        if stage == INIT:
            r_loss = repdistiller_init_loss(distill, r_student, r_teacher, x, r_modules)
            r_lr = r_init_lr(student_name, distill)
            r_params = r_init_modules(distill, r_student, r_modules).parameters()
        else:
            r_loss = repdistiller_main_loss(distill, r_student, r_teacher, x, y, r_modules)
            r_lr = r_learning_rate(student_name)
            r_params = r_trainable_modules(distill, r_student, r_modules).parameters()
        assert lr == r_lr, stage
        assert loss == pytest.approx(r_loss.item(), rel=1e-6), stage
        r_opt = r_sgd(r_params, r_lr)
        r_opt.zero_grad()  # as R does before each backward
        r_loss.backward()
        r_opt.step()
        after = snapshot()
        for part in before[0]:
            unequal = known if part == "student" else frozenset()
            _same_moves(before[0][part], after[0][part], before[1][part], after[1][part],
                        f"{stage} {part}", unequal)
    ours.trainee.recorder.remove()


# ---- through the engine ----------------------------------------------------------------------

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
STUDENT = Spec("resnet8", {"width": 0.25})
RECIPE = Recipe(epochs=2, batch_size=32, lr=0.05)
STEPS = 3  # 96 images in batches of 32
SMALL = {"ab": {"init_epochs": 2}, "ft": {"init_epochs": 2, "init_lr": 0.01},
         "fsp": {"init_epochs": 2, "init_lr": 0.02}}
#: The teacher's width per method: wider than the student (unequal channels: AB's connectors,
#: FT), or as wide (FSP).
TEACHER_WIDTH = {"ab": 0.5, "ft": 0.5, "fsp": 0.25}


class Kill(Exception):
    """Raised in place of one of the engine's steps."""


def load_data() -> DataBundle:
    """The small synthetic training set of the engine tests."""
    return load_dataset(DATA)


def train_teacher(data: DataBundle, name: str) -> nn.Module:
    """The teacher of ``name``'s engine tests, trained two epochs."""
    return train(data, Spec("resnet8", {"width": TEACHER_WIDTH[name]}), build_method("student"),
                 Recipe(epochs=2, batch_size=32), 0, make_accelerator("cpu")).model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _kill_at(monkeypatch, call: int) -> None:
    """The engine's ``call``-th step loss (1-based) raises Kill."""
    real, count = engine.step_loss, [0]

    def step_loss(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise Kill
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "step_loss", step_loss)


def check_the_initialisation_stage_runs_first(name: str, data: DataBundle,
                                              teacher: nn.Module) -> None:
    """Two initialisation epochs (no labels, the stage's lr, its own term), then the main
    stage's (the cross-entropy; FT's term, nothing of AB's or FSP's)."""
    method = build_method(name, {name: SMALL[name]})
    result = train(data, STUDENT, method, RECIPE, 1, make_accelerator("cpu"), teacher)
    stages = [h.get("stage", MAIN) for h in result.history]
    assert stages == [INIT, INIT, MAIN, MAIN]
    init, main_ = result.history[:2], result.history[2:]
    init_term = "ft.rec" if name == "ft" else name
    assert all(h["lr"] == (method.needs.init.lr or RECIPE.lr) for h in init)
    assert all("ce" not in h and h[init_term] > 0 for h in init)
    assert all("ce" in h and init_term not in h for h in main_)
    if name == "ft":
        assert all(h["ft"] > 0 for h in main_)
    else:
        assert all(set(h) & {"ab", "fsp"} == set() for h in main_)  # R: loss_kd = 0


def check_what_the_initialisation_stage_trains(name: str, data: DataBundle, teacher: nn.Module,
                                               tmp_path, monkeypatch) -> None:
    """After the stage: AB moved the student's features and its connectors, FSP the student's
    features, neither the classifier; FT left the student as built (eval mode, no gradient)
    and the translator too, and trained the paraphraser alone."""
    ckpt = tmp_path / "ckpt.pt"
    with monkeypatch.context() as patch:
        _kill_at(patch, 2 * STEPS + 1)  # the main stage's first step
        with pytest.raises(Kill):
            train(data, STUDENT, build_method(name, {name: SMALL[name]}), RECIPE, 1,
                  make_accelerator("cpu"), teacher, checkpoint=ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["trainee"]
    # the student and the method as the engine builds them, before any step
    set_seed(1)
    student = build_model(STUDENT, data.num_classes, data.in_channels)
    set_seed(derived_seed(1, 2))
    method = build_method(name, {name: SMALL[name]})
    prepare(method, student, teacher, data.probe(), data.train_labels(), data.num_classes)
    fresh = Trainee(student, method).state_dict()
    assert fresh.keys() == state.keys()
    moved = {k for k, v in fresh.items() if not torch.equal(state[k], v)}
    params = {f"student.{k}" for k, _ in student.named_parameters()}
    features = params - {"student.fc.weight", "student.fc.bias"}
    if name == "ft":
        para = {k for k in state if k.startswith("method.paraphraser.")}
        assert para and moved == para
    elif name == "ab":
        connectors = {f"method.{k}" for k, _ in method.named_parameters()}
        assert connectors and connectors <= moved
        assert moved & params == features
    else:
        assert moved & params == features and not any(k.startswith("method.") for k in state)


#: Kill points of the resume test: inside the initialisation stage, and inside the main one.
KILL_AT = [STEPS + 2, 2 * STEPS + STEPS + 2]


def check_a_run_killed_inside_either_stage_resumes_exactly(name: str, kill_at: int,
                                                           data: DataBundle, teacher: nn.Module,
                                                           tmp_path, monkeypatch) -> None:
    """A run killed at the ``kill_at``-th step and resumed from its checkpoint ends as the
    uninterrupted run does."""
    acc = make_accelerator("cpu")
    full = train(data, STUDENT, build_method(name, {name: SMALL[name]}), RECIPE, 2, acc, teacher)
    ckpt = tmp_path / "ckpt.pt"
    with monkeypatch.context() as patch:
        _kill_at(patch, kill_at)
        with pytest.raises(Kill):
            train(data, STUDENT, build_method(name, {name: SMALL[name]}), RECIPE, 2, acc,
                  teacher, checkpoint=ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["history"]
    assert len(saved) == (kill_at - 1) // STEPS  # the epochs finished before the kill
    resumed = train(data, STUDENT, build_method(name, {name: SMALL[name]}), RECIPE, 2, acc,
                    teacher, checkpoint=ckpt)
    assert resumed.history == full.history
    assert _same(resumed.model, full.model)


class InitialisationStageTests:
    """The tests each of ``ab``, ``ft`` and ``fsp`` runs alike, collected through a ``Test…``
    subclass in its module that names the method (``name``) and the (teacher, student) pairs
    of the comparison with RepDistiller (``pairs``): both stages of one batch equal R's, and
    through the engine the initialisation stage runs first, trains what it should, and a run
    killed inside either stage resumes exactly."""

    name: str
    pairs: list[tuple[str, str]]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """The subclass's ``pairs`` parametrize the comparison with R."""
        if "student_name" in metafunc.fixturenames:
            metafunc.parametrize("teacher_name,student_name", self.pairs)

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls) -> DataBundle:
        """The engine tests' training set."""
        return load_data()

    @pytest.fixture(scope="class")
    @classmethod
    def teacher(cls, data: DataBundle) -> nn.Module:
        """The method's teacher of the engine tests (see :data:`TEACHER_WIDTH`)."""
        return train_teacher(data, cls.name)

    def test_both_stages_equal_rs(self, teacher_name, student_name):
        check_both_stages_equal_rs(self.name, teacher_name, student_name)

    def test_the_initialisation_stage_runs_first(self, data, teacher):
        check_the_initialisation_stage_runs_first(self.name, data, teacher)

    def test_what_the_initialisation_stage_trains(self, data, teacher, tmp_path, monkeypatch):
        check_what_the_initialisation_stage_trains(self.name, data, teacher, tmp_path,
                                                   monkeypatch)

    @pytest.mark.parametrize("kill_at", KILL_AT)
    def test_a_run_killed_inside_either_stage_resumes_exactly(self, kill_at, data, teacher,
                                                              tmp_path, monkeypatch):
        check_a_run_killed_inside_either_stage_resumes_exactly(
            self.name, kill_at, data, teacher, tmp_path, monkeypatch)
