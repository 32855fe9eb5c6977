"""What the tests of the relational methods ``sp``, ``pkt`` and ``rkd`` share: loop-level
building blocks (float64, plain Python), feature pairs, the gradient and precision checks of a
loss, the methods with ``kd``, and the loss of a configured method against an independent
re-statement of RepDistiller's (tests/ref_repdistiller_relational.py), kt-bench's side through
the lifecycle; :class:`RelationalMethodTests` holds the tests all three run alike."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import tomllib
import torch
from torch import nn

from kt_bench.api.method import Batch, CombinedMethod, build_method, method_config
from kt_bench.training.recipe import Recipe

from ..ref_repdistiller_relational import (
    R_RELATIONAL_FLAGS,
    repdistiller_relational_loss,
    repdistiller_relational_parts,
)
from .composition import assert_config_error, prepare, seeded_models, step_total

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Direct = Callable[[torch.Tensor, torch.Tensor], float]


def rows(f: torch.Tensor) -> list[list[float]]:
    """Each sample of ``f`` flattened, as a float64 Python list."""
    return [f[i].detach().double().flatten().tolist() for i in range(f.shape[0])]


def dot(a: list[float], b: list[float]) -> float:
    """The dot product of two lists."""
    return sum(x * y for x, y in zip(a, b, strict=True))


#: (student shape, teacher shape): B = 2 included; unequal sizes (all three allow them).
SHAPES = [
    ((2, 3, 4, 4), (2, 5, 2, 2)),
    ((5, 3, 4, 4), (5, 5, 2, 2)),
    ((6, 7), (6, 11)),
    ((4, 9), (4, 9)),
]


def pair(s_shape, t_shape, seed=0, scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded float64 student and teacher features of the given shapes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s_shape, dtype=torch.float64, generator=g) * scale,
            torch.randn(t_shape, dtype=torch.float64, generator=g) * scale)


# ---- gradients -------------------------------------------------------------------------------

#: The (student, teacher) shapes of the gradient checks.
GRADIENT_SHAPES = [((4, 2, 2, 2), (4, 3, 1, 1)), ((2, 5), (2, 3))]


def check_gradient(name: str, loss_fn: Loss, direct: Direct, s_shape, t_shape) -> None:
    """Autograd of the loss reaches the student only and matches central differences of the
    loop (both float64)."""
    f_s, f_t = pair(s_shape, t_shape, seed=4)
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    loss_fn(f_s, f_t).backward()
    assert f_t.grad is None or torch.count_nonzero(f_t.grad) == 0
    grad = f_s.grad.flatten()
    h = 1e-6
    flat = f_s.detach().flatten()
    numeric = []
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += h
        minus[i] -= h
        numeric.append((direct(plus.view(s_shape), f_t) - direct(minus.view(s_shape), f_t))
                       / (2 * h))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    scale = numeric.abs().max().item()
    if s_shape[0] > 2 or name.startswith("sp") or name.startswith("pkt"):
        assert scale > 1e-6  # the check means something
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-6 * max(scale, 1e-6)), (grad, numeric)


# ---- the methods -----------------------------------------------------------------------------

def taps() -> tuple[dict, dict]:
    """(student, teacher) taps of four samples: a stage map and pooled features."""
    s = {"stage3": torch.randn(4, 8, 2, 2), "pool": torch.randn(4, 8)}
    t = {"stage3": torch.randn(4, 6, 2, 2), "pool": torch.randn(4, 6)}
    return s, t


#: A Batch of the four samples of :func:`taps`.
BATCH4 = Batch(torch.zeros(4, dtype=torch.long))


def check_kd_plus(other: str) -> None:
    """``kd+<other>`` returns both terms, ``other``'s as the method alone computes it."""
    method = build_method(f"kd+{other}", {"kd": {"weight": 0.9}, other: {"weight": 2.0}})
    assert isinstance(method, CombinedMethod)
    tap = "feat" if other == "sp" else "pool"
    assert method.taps == ("logits", tap)
    s = {"logits": torch.randn(4, 10), tap: torch.randn(4, 6, 2, 2) if other == "sp"
         else torch.randn(4, 6)}
    t = {"logits": torch.randn(4, 10), tap: torch.randn(4, 5, 2, 2) if other == "sp"
         else torch.randn(4, 7)}
    terms = method.loss_terms(s, t, BATCH4)
    assert set(terms) == {"kd", other}
    single = build_method(other).loss_terms(s, t, BATCH4)[other]
    assert terms[other].item() == pytest.approx(single.item(), rel=1e-6)
    assert method.term_weights(0, 240) == {"kd": 0.9, other: 2.0}


# ---- RepDistiller's composition --------------------------------------------------------------

#: The grid options (TOML, as handed to crd-cifar100) that reproduce RepDistiller's runs.
GRID_TOML = """
[method_options.sp]
weight = 3000.0
tap = "stage3"

[method_options.pkt]
weight = 30000.0
tap = "pool"
eps = 1e-7

[method_options.rkd]
weight = 1.0
tap = "pool"
w_dist = 25.0
w_angle = 50.0
"""

#: Per-pair overrides: RepDistiller's feat[-2] of VGG is its fourth stage.
PAIR_OVERRIDES = {("vgg13", "vgg8"): {"sp": {"tap": "stage4"}}}

PAIRS = [("resnet56", "resnet20"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")]


def grid_options(pair_: tuple[str, str], name: str) -> dict:
    """The grid's options of ``name`` for the (teacher, student) ``pair_``."""
    options = dict(tomllib.loads(GRID_TOML)["method_options"][name])
    options.update(PAIR_OVERRIDES.get(pair_, {}).get(name, {}))
    return options


def check_grid_options_carry_repdistillers_flags(name: str) -> None:
    """R's flags for ``name``: CE alone besides the term, weighted as the grid weighs it."""
    gamma, alpha, beta = R_RELATIONAL_FLAGS[name]
    assert (gamma, alpha) == (1.0, 0.0)  # -r default 1, -a 0: CE alone besides the term
    assert grid_options(("resnet56", "resnet20"), name)["weight"] == beta


def _calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Running statistics from ``images`` (cumulative averages), so that the eval-mode teacher's
    activations have a trained network's scale; with arbitrary statistics a deep ResNet's
    pooled features reach ~1e5, where the relational losses are ill-conditioned in float32."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m in bns:
        m.momentum = 0.1


def _models(teacher_name: str, student_name: str, dtype: torch.dtype = torch.float32):
    teacher, student, g = seeded_models(teacher_name, student_name)
    _calibrate_batchnorm(teacher, torch.randn(32, 3, 32, 32, generator=g))
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (8,), generator=g)
    return teacher.to(dtype), student.to(dtype), x.to(dtype), y


def _setup(name: str, teacher_name: str, student_name: str, dtype: torch.dtype):
    teacher, student, x, y = _models(teacher_name, student_name, dtype)
    config = method_config(name, {name: grid_options((teacher_name, student_name), name)})
    method = build_method(name, config)
    prepare(method, student, teacher, x)
    return method, teacher, student, x, y


def _rel32(name: str, teacher_name: str) -> float:
    """Relative tolerance on the float32 total.

    PKT's KL between the near-uniform row distributions of untrained networks (cosines near 1)
    is ill-conditioned: a relative change of 1e-7 in the features (an equally valid rounding of
    the same pooling) moves the term by up to ~1e-2 of itself, i.e. ~1e-5 of the total; the
    float64 check checks PKT tightly. WRN: R pools with avg_pool2d(8), kt-bench adaptively
    (equal up to rounding).
    """
    if teacher_name.startswith("wrn") and name != "sp":
        return 1e-4
    return 5e-5 if name == "pkt" else 1e-5


def check_loss_equals_repdistillers(name: str, teacher_name: str, student_name: str) -> None:
    """The engine step's float32 loss and the student's gradients equal R's."""
    method, teacher, student, x, y = _setup(name, teacher_name, student_name, torch.float32)
    recipe = Recipe(epochs=240)  # R: gamma (ce_weight) 1, 240 epochs
    ours = step_total(method, recipe, student, teacher, x, y)
    theirs = repdistiller_relational_loss(name, student, teacher, x, y)
    rel = _rel32(name, teacher_name)
    assert ours.item() == pytest.approx(theirs.item(), rel=rel)
    g_ours = torch.autograd.grad(step_total(method, recipe, student, teacher, x, y),
                                 list(student.parameters()))
    g_theirs = torch.autograd.grad(repdistiller_relational_loss(name, student, teacher, x, y),
                                   list(student.parameters()))
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < 10 * rel


def check_transfer_term_equals_repdistillers_in_float64(name: str, teacher_name: str,
                                                        student_name: str) -> None:
    """The weighted term alone (cross-entropy weight 0), on float64 models and batch: the two
    feature paths then agree to rounding of 1e-16, and so do the two losses (kt-bench's keep
    float64), which a float32 comparison cannot show for PKT."""
    method, teacher, student, x, y = _setup(name, teacher_name, student_name, torch.float64)
    ours = step_total(method, Recipe(epochs=240, ce_weight=0.0), student, teacher, x, y)
    beta = R_RELATIONAL_FLAGS[name][2]
    theirs = beta * repdistiller_relational_parts(name, student, teacher, x, y)["kd"]
    assert theirs.dtype == torch.float64
    assert theirs.item() > 1e-3  # weighted as R weighs it, the term is no rounding error
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


class RelationalMethodTests:
    """The tests each relational method's module runs alike, collected through a ``Test…``
    subclass there that states the method: its ``name``, its loss function ``loss``, its
    registered ``defaults``, its ``bad_options`` (``(options, match)`` pairs), ``on_taps``
    and ``gradients``. The loss is zero for equal inputs, gives the student (only) the
    gradient its loop-level formula does, refuses unequal batches and computes in float32; the
    method registers its defaults, computes its term on its tap and refuses bad options;
    ``kd+<name>`` returns both terms; the grid's options carry RepDistiller's flags; and the
    engine step's loss (float32) and weighted term (float64) equal RepDistiller's on each of
    :data:`PAIRS`."""

    name: str
    loss: Loss
    defaults: dict
    bad_options: list[tuple[dict, str]]
    #: The losses whose gradients are checked, by name: (loss function, loop-level formula).
    gradients: dict[str, tuple[Loss, Direct]]
    #: Options, and what the loss function gives on :func:`taps` for the tap they choose (the
    #: method's term there).
    on_taps: tuple[dict, Callable[[dict, dict], torch.Tensor]]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """The subclass's ``gradients`` and ``bad_options`` parametrize the tests that read
        them."""
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", list(self.gradients))
        if "match" in metafunc.fixturenames:
            metafunc.parametrize("options,match", self.bad_options)

    # ---- the loss

    @pytest.mark.parametrize("shape", [(2, 3, 4, 4), (6, 10)])
    def test_identical_inputs_give_zero(self, shape):
        f = torch.randn(shape, dtype=torch.float64)
        assert self.loss(f, f).item() == pytest.approx(0.0, abs=1e-10)

    @pytest.mark.parametrize("s_shape,t_shape", GRADIENT_SHAPES)
    def test_gradient_reaches_the_student_only_and_matches_finite_differences(self, case, s_shape,
                                                                              t_shape):
        """Autograd of the loss against central differences of the loop (both float64)."""
        loss_fn, direct = self.gradients[case]
        check_gradient(case, loss_fn, direct, s_shape, t_shape)

    def test_the_batches_must_match(self):
        """The loss refuses student and teacher batches of different sizes."""
        f_s, f_t = torch.randn(4, 3), torch.randn(5, 3)
        with pytest.raises(ValueError, match="batch sizes 4 and 5"):
            self.loss(f_s, f_t)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_half_and_single_inputs_are_computed_in_float32(self, dtype):
        """Half and single inputs give a float32 loss, close to the float64 one."""
        f_s, f_t = torch.randn(6, 12).to(dtype), torch.randn(6, 8).to(dtype)
        got = self.loss(f_s, f_t)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(self.loss(f_s.double(), f_t.double()).item(),
                                           rel=1e-3)

    def test_the_math_stays_float32_under_bf16_autocast(self):
        """Under bf16 autocast the math stays float32 (the same value as without)."""
        f_s, f_t = torch.randn(16, 64), torch.randn(16, 32)
        full = self.loss(f_s, f_t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = self.loss(f_s, f_t)
        assert mixed.dtype == torch.float32
        assert mixed.item() == pytest.approx(full.item(), rel=1e-6)

    # ---- the method

    def test_registered_defaults(self):
        """The registered defaults; the built method reads their tap and weighs its one term
        by its weight."""
        assert method_config(self.name) == {self.name: self.defaults}
        method = build_method(self.name)
        assert method.taps == (self.defaults["tap"],)
        assert method.term_weights(0, 240) == {self.name: method.weight}

    def test_the_method_computes_its_loss_on_its_tap(self):
        options, expected = self.on_taps
        s, t = taps()
        method = build_method(self.name, {self.name: options})
        assert method.taps == (options.get("tap", self.defaults["tap"]),)
        assert method.loss_terms(s, t, BATCH4)[self.name].item() == pytest.approx(
            expected(s, t).item(), rel=1e-6)

    def test_bad_options_are_config_errors(self, options, match):
        assert_config_error(self.name, options, match)

    def test_kd_plus_returns_both_terms(self):
        check_kd_plus(self.name)

    # ---- RepDistiller's composition

    def test_the_grid_options_carry_repdistillers_flags(self):
        check_grid_options_carry_repdistillers_flags(self.name)

    @pytest.mark.parametrize("teacher_name,student_name", PAIRS)
    def test_loss_equals_repdistillers(self, teacher_name, student_name):
        check_loss_equals_repdistillers(self.name, teacher_name, student_name)

    @pytest.mark.parametrize("teacher_name,student_name", PAIRS)
    def test_transfer_term_equals_repdistillers_in_float64(self, teacher_name, student_name):
        check_transfer_term_equals_repdistillers_in_float64(self.name, teacher_name,
                                                            student_name)
