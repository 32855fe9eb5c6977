"""What the tests of ``cc`` and ``vid`` share: one engine step of a method whose trainable
parts (CC's embeddings, VID's heads) join the optimiser, combinations, float32 terms under
bf16, and the loss of a configured method against an independent re-statement of
RepDistiller's (tests/ref_repdistiller_cc_vid.py), kt-bench's side through the lifecycle."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kt_bench.api.method import Batch, Method, build_method, method_config
from kt_bench.models import build_model
from kt_bench.training.lifecycle import Trainee
from kt_bench.training.recipe import Recipe

from ..ref_repdistiller_cc_vid import R_FLAGS_CC_VID, repdistiller_cc_vid_loss
from ..repdistiller_ref import repdistiller_feats
from .composition import gen, prepare, read_teacher, seeded_models, step, step_total

VGG_LAYERS = ["stage1", "stage2", "stage3", "stage4"]


def pair() -> tuple[nn.Module, nn.Module]:
    """(student, teacher): resnet8 and the wider resnet8x4, ten classes."""
    torch.manual_seed(0)
    return build_model("resnet8", 10), build_model("resnet8x4", 10)


def train_one_step(method_name: str, options: dict | None = None):
    """Prepare the method as the engine does and run one SGD step of the Trainee on the
    engine's step loss; returns the method, the optimiser, each parameter's value before the
    step and its gradient."""
    student, teacher = pair()
    method = build_method(method_name, method_config(method_name, options))
    x = torch.randn(4, 3, 32, 32, generator=gen(3))
    y = torch.randint(0, 10, (4,), generator=gen(4))
    prepare(method, student, teacher, x, num_classes=10)
    trainee = Trainee(student, method).train()
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.1)
    step(trainee, teacher, x, y).loss.backward()
    trainee.recorder.remove()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    return method, optimizer, before, grads


def check_trainable_parts(name: str, expected: dict[str, tuple[int, ...]]) -> None:
    """The method's parameters are ``expected`` (name: shape), all in the optimiser, each with
    a gradient and moved by the step."""
    method, optimizer, before, grads = train_one_step(name)
    params = dict(method.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == expected
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in params.values())
    for n, p in params.items():
        assert torch.count_nonzero(grads[n]) > 0, n
        assert not torch.equal(p.detach(), before[n]), n


#: Where each method's own trainable parts live in a combination.
OWNED = {"cc": ".embed_t.", "vid": ".heads."}


def check_combination(spec: str, names: set[str]) -> None:
    """The combination ``spec`` builds, prepares, weighs every member's term and trains every
    member's own parts."""
    method, optimizer, _, grads = train_one_step(spec)
    assert set(method.term_weights(0, 1)) == names
    trainable = {n for n, _ in method.named_parameters()}
    for name in names - {"kd"}:
        assert any(n.startswith("members.") and OWNED[name] in n for n in trainable), name
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())


def check_float32_under_bf16_autocast(name: str) -> None:
    """Under bf16 autocast the method's term is float32, finite, and reaches its parameters."""
    student, teacher = pair()
    method = build_method(name, method_config(name))
    x = torch.randn(2, 3, 32, 32, generator=gen(9))
    prepare(method, student, teacher, x, num_classes=10)
    trainee = Trainee(student, method).train()

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    t_taps = read_teacher(method, teacher, x, bf16)
    with bf16():
        _, terms = trainee(x, t_taps, Batch(torch.zeros(2, dtype=torch.long)))
    assert terms[name].dtype == torch.float32 and torch.isfinite(terms[name])
    terms[name].backward()
    assert all(p.grad is not None for p in method.parameters())


# ---- against RepDistiller's composition ------------------------------------------------------

#: The grid options that reproduce R's configuration (VGG pairs override vid's layers).
GRID_OPTIONS = {"cc": {"weight": 0.02, "feat_dim": 128},
                "vid": {"weight": 1.0, "layers": ["stage1", "stage2", "stage3"],
                        "init_var": 5.0, "eps": 1e-5}}
#: (teacher, student, relative tolerance of the float32 loss).
PAIRS = [("resnet56", "resnet20", 1e-5), ("vgg13", "vgg8", 1e-5), ("wrn_40_2", "wrn_16_2", 1e-4)]

#: R's freshly built modules from the student's and the teacher's features, checked against
#: kt-bench's freshly prepared method: ``f(method, feat_s, feat_t) -> modules``.
MakeR = Callable[[Method, list, list], nn.ModuleList]


def check_loss_equals_repdistillers(name: str, teacher_name: str, student_name: str, rel: float,
                                    make_r: MakeR,
                                    load_into: Callable[[Method, nn.ModuleList], None],
                                    adjust: Callable[[Method, torch.Generator], None] | None = None
                                    ) -> None:
    """The engine step's loss on one batch equals R's on the same weights (``load_into``
    copies kt-bench's trainable parameters into R's modules, after ``adjust`` changed the
    freshly prepared method), and so do the gradients reaching the student and the method's
    own parameters."""
    assert R_FLAGS_CC_VID[name][2] == GRID_OPTIONS[name]["weight"]
    teacher, student, g = seeded_models(teacher_name, student_name)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (8,), generator=g)
    options = {name: dict(GRID_OPTIONS[name])}
    if name == "vid" and teacher_name.startswith("vgg"):
        options["vid"]["layers"] = VGG_LAYERS
    method = build_method(name, method_config(name, options))
    prepare(method, student, teacher, x)
    with torch.no_grad():
        feat_s, _ = repdistiller_feats(student.eval(), x[:2])
        feat_t, _ = repdistiller_feats(teacher.eval(), x[:2])
    modules = make_r(method, feat_s, feat_t)
    if adjust is not None:
        adjust(method, g)
    load_into(method, modules)

    recipe = Recipe(epochs=240)

    def ours_loss() -> torch.Tensor:
        return step_total(method, recipe, student, teacher, x, y)

    ours = ours_loss()
    theirs = repdistiller_cc_vid_loss(name, student, teacher, x, y, modules)
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-6)

    # the same gradients reach the student and the method's own parameters
    ours = ours_loss()
    g_ours = torch.autograd.grad(ours, [*student.parameters(), *method.parameters()])
    theirs = repdistiller_cc_vid_loss(name, student, teacher, x, y, modules)
    g_theirs = torch.autograd.grad(theirs, [*student.parameters(), *modules.parameters()])
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 rounding (measured <= 3e-7)
    n_method = sum(p.numel() for p in method.parameters())
    assert torch.count_nonzero(a[-n_method:]) > 0
