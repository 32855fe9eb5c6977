"""torch.compile (``--compile``): compiled students compute what eager ones do, and each keeps
its own taps.

What is checked is what can be checked: the loss and every gradient of the first steps of
every built-in method, compiled against eager on the same weights and batches. A whole epoch is
not compared: training amplifies the float reordering of compiled kernels, by an amount that
depends on the CPU's instruction set. (The 0.7% gap after one epoch once seen on an AVX2 CPU
was not such drift but a wrong oneDNN weight gradient, which this check finds in the first
step; see ``training_memory_format``.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from kt_bench.api.method import INIT, METHODS, build_method
from kt_bench.core.options import Spec
from kt_bench.core.seeds import derived_seed
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder
from kt_bench.training.device import (
    channels_last,
    compile_model,
    make_accelerator,
)
from kt_bench.training.engine import build_trainee
from kt_bench.training.lifecycle import (
    TeacherTaps,
    base_ce_weight,
    plan_epoch,
    step_loss,
)
from kt_bench.training.recipe import Recipe

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
TEACHER = Spec("resnet8", {"width": 0.5})
STUDENT = Spec("resnet8", {"width": 0.25})
EQUAL_TEACHER = Spec("resnet14", {"width": 0.25})
RECIPE = Recipe(epochs=3, batch_size=32, lr=0.05)
STEPS = 2

#: Compiled against eager, relative: the loss, and each gradient tensor by its norm (or, for a
#: tensor whose gradient is zero up to rounding, such as a bias before a BatchNorm, by
#: :data:`FLOOR` times the whole gradient's norm). Measured over every built-in method's first
#: two steps on a 2-core AVX2 AMD EPYC (PyTorch 2.14.1): losses within 1.5e-6 (PKT; most under
#: 5e-7), gradients within 9.9e-5 (NST's, whose kernel sums cancel; 17 of 21 methods under
#: 5e-6). A wrong kernel is off by far more: 13-59% for oneDNN's channels-last weight gradient
#: of a strided 1x1 convolution on that CPU (see ``training_memory_format``).
TOLERANCE = 5e-4
FLOOR = 1e-2


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teachers(data):
    """A wider teacher, and one of the student's widths for FSP, which needs equal channels
    (untrained: the comparison needs only fixed weights)."""
    out = {}
    for key, spec in (("wider", TEACHER), ("equal", EQUAL_TEACHER)):
        set_seed(0)
        model = build_model(spec, data.num_classes, data.in_channels)
        out[key] = model.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return out


def first_steps(name: str, data, teacher, compile: bool) -> list[tuple[float, dict]]:
    """The loss and the gradients of the first :data:`STEPS` steps of method ``name``'s
    student, set up and stepped through the method lifecycle as the engine does (seeds,
    layout, the stage's optimiser and mode; its first stage: the initialisation stage where
    the method has one)."""
    acc = make_accelerator("cpu")
    method = build_method(name)
    seed = 1
    trainee = build_trainee(data, STUDENT, method, seed, acc.device, teacher, compile)
    plan = plan_epoch(method, 0, RECIPE.epochs, base_ce_weight(method, RECIPE.ce_weight))
    init = method.needs.init
    lr = (init.lr or RECIPE.lr) if plan.stage == INIT else RECIPE.lr
    optimizer = torch.optim.SGD(trainee.parameters(), lr=lr, momentum=RECIPE.momentum,
                                nesterov=RECIPE.nesterov, weight_decay=RECIPE.weight_decay)
    trainee, optimizer = acc.prepare(trainee, optimizer)
    trainee.train()
    if plan.stage == INIT and not init.trains_student:
        trainee.student.eval()
    taught = TeacherTaps(teacher, [method]) if method.needs_teacher else None
    out = []
    batches = data.train_batches(0, seed, RECIPE.batch_size, acc.device, indices=True)
    for step, (x, y, idx) in zip(range(1, STEPS + 1), batches, strict=False):
        x = channels_last(x)
        t_taps = (TeacherTaps.of(method, taught.read(x, [method], acc.autocast))
                  if taught is not None else None)
        batch = plan.batch(y, idx, derived_seed(seed, 5, 0, step))
        with acc.autocast():
            loss = step_loss(trainee, x, batch, t_taps, plan).loss
        acc.backward(loss)
        grads = {n: p.grad.detach().clone() for n, p in trainee.named_parameters()
                 if p.grad is not None}
        out.append((loss.item(), grads))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if taught is not None:
        taught.remove()
    return out


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, ``floor``) (the absolute difference where both are zero)."""
    scale = max(b.norm().item(), floor)
    diff = (a - b).norm().item()
    return diff / scale if scale > 0 else diff


def worst_gradient(compiled: dict, eager: dict) -> tuple[float, str]:
    """The largest relative difference of a gradient tensor, and its parameter's name."""
    whole = torch.cat([g.flatten() for g in eager.values()]).norm().item()
    return max(((relative(compiled[k], eager[k], FLOOR * whole), k) for k in eager),
               default=(0.0, ""))


#: Methods checked in the default run: NST-poly (the paper's method; its first compilation
#: also pays Inductor's start, 30-45 s on 2 cores). The others, compiled one by one (8-20 s
#: each), among them AT's stage taps, CRD's indices and banks, OFD's batch-statistics teacher
#: and FT's initialisation stage, run with ``-m slow``.
DEFAULT_RUN = ("nst_poly",)


#: Methods whose compiled first step differs from eager in a known way: in AB's and FSP's
#: initialisation stage the logits are out of the loss, and the compiled graph gives the
#: classifier zero gradients where eager gives none (so SGD's weight decay would touch it
#: there). Found in this check, open; FT's stage (student in eval mode) does not show it.
KNOWN_DIFFERENT = {"ab": "zero, not absent, classifier gradients in the init stage",
                   "fsp": "zero, not absent, classifier gradients in the init stage"}


def _marks(name: str) -> tuple:
    marks = () if name in DEFAULT_RUN else (pytest.mark.slow,)
    if name in KNOWN_DIFFERENT:
        marks += (pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENT[name]),)
    return marks


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n))
                                  for n in sorted(METHODS.names())])
def test_first_steps_of_a_compiled_student_match_eager(name, data, teachers):
    teacher = teachers["equal" if name == "fsp" else "wider"]
    torch._dynamo.reset()
    eager = first_steps(name, data, teacher, compile=False)
    compiled = first_steps(name, data, teacher, compile=True)
    for step, ((loss_c, grads_c), (loss_e, grads_e)) in enumerate(
            zip(compiled, eager, strict=True), start=1):
        assert loss_c == pytest.approx(loss_e, rel=TOLERANCE), (name, step)
        assert grads_c.keys() == grads_e.keys(), (name, step)
        worst = worst_gradient(grads_c, grads_e)
        assert worst[0] <= TOLERANCE, (name, step, worst)


@pytest.mark.slow  # 23 s on 2 cores: three students compiled
def test_compiled_students_of_one_class_each_record_their_own_taps(data):
    """Dynamo shares compiled code between instances of a class: each student must still run
    its own hooks. Two students of one class with different weights, tapped at different
    places, compiled, called in turn: each records exactly its own taps, with the values its
    eager forward gives (another student's hooks would record the wrong keys or values)."""
    torch._dynamo.reset()
    x = data.probe()
    students, recorders, expected = [], [], []
    for seed, taps in ((0, ("stage1", "stage2", "stage3")), (1, ("feat",)), (2, ("stage2",))):
        set_seed(seed)
        student = build_model(STUDENT, data.num_classes, data.in_channels).eval()
        recorder = TapRecorder(student, student.tap_map, taps)
        with torch.no_grad():
            expected.append(recorder.collect(student(x)))
        compile_model(student)
        students.append(student)
        recorders.append(recorder)
    for _ in range(2):  # the second round runs each student's cached compiled code
        for student, recorder, want in zip(students, recorders, expected, strict=True):
            with torch.no_grad():
                got = recorder.collect(student(x))
            assert got.keys() == want.keys()
            for tap in want:
                assert relative(got[tap], want[tap]) <= TOLERANCE, tap
    # the students differ where it matters: a swapped hook would be seen
    assert relative(expected[0]["logits"], expected[1]["logits"]) > 1e-2


def test_the_tests_compile_into_a_private_cache():
    """The test session's compiled kernels go to a folder of its own (set up by conftest),
    not to PyTorch's shared default cache that other runs write to and leave behind."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    assert cache_dir() == os.environ["TORCHINDUCTOR_CACHE_DIR"] != default_cache_dir()
    assert Path(cache_dir()).name.startswith("kt-bench-tests-inductor-")
    assert Path(cache_dir()).parent == Path(tempfile.gettempdir())
