"""The registry, the method combinations and plugin discovery from all three sources."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kt_bench.api.method import METHODS, Batch, CombinedMethod, build_method
from kt_bench.api.plugins import load_entry_points, load_plugin_dir, load_plugins
from kt_bench.core.errors import ConfigError, PluginError, UnknownNameError
from kt_bench.core.registry import Registry

BUILTIN = ["ab", "at", "cc", "crd", "dist", "dkd", "fitnet", "fsp", "ft", "kd", "kd_ls",
           "nst_gauss", "nst_linear", "nst_poly", "ofa", "ofd", "pkt", "reviewkd", "rkd", "sp",
           "student", "vid"]

PLUGIN = '''
import torch
from kt_bench import Method, register_method

@register_method("{name}")
class Plugged(Method):
    """A test plugin: the squared mean difference of the logits."""
    default_weight = 2.0

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("logits",)

    def loss_terms(self, student, teacher, batch):
        return {{self.name: (student["logits"] - teacher["logits"]).mean() ** 2}}
'''


#: A batch for calling ``loss_terms`` directly (the methods here read no labels).
BATCH = Batch(labels=torch.zeros(4, dtype=torch.long))


def write_plugin(folder: Path, filename: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(PLUGIN.format(name=name))
    return path


def test_registry_lookup_and_unknown_name_lists_known_names():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1, origin="a.py")
    reg.register("beta", 2, origin="b.py")
    assert reg.get("beta") == 2 and reg.names() == ["alpha", "beta"]
    with pytest.raises(UnknownNameError) as exc:
        reg.get("alpah")
    msg = str(exc.value)
    assert msg == "unknown widget 'alpah' (did you mean 'alpha'?); known: alpha, beta"
    assert "\n" not in msg


def test_registry_duplicate_name_names_both_files():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1, origin="/x/a.py")
    with pytest.raises(PluginError, match=r"duplicate widget name 'alpha': defined in /x/a.py "
                                          r"and again in /y/b.py"):
        reg.register("alpha", 2, origin="/y/b.py")


def test_builtin_methods_are_found_in_the_methods_folder():
    load_plugins()
    assert set(BUILTIN) <= set(METHODS.names())
    assert Path(METHODS.origin("nst_poly")).name == "nst.py"
    assert Path(METHODS.origin("kd")).parent.name == "methods"


def test_plugin_folder_registers_methods(tmp_path):
    write_plugin(tmp_path / "plugs", "mine.py", "mine")
    load_plugins([tmp_path / "plugs"])
    method = build_method("mine")
    assert method.weight == 2.0 and method.taps == ("logits",)
    s, t = torch.zeros(2, 3), torch.ones(2, 3)
    terms = method.loss_terms({"logits": s}, {"logits": t}, BATCH)
    assert terms["mine"].item() == pytest.approx(1.0)


def test_plugin_folder_from_environment_variable(tmp_path, monkeypatch):
    write_plugin(tmp_path / "env_plugs", "from_env.py", "from_env")
    monkeypatch.setenv("KT_BENCH_PLUGINS", str(tmp_path / "env_plugs"))
    load_plugins()
    assert "from_env" in METHODS


def _fake_distribution(site: Path, dist: str, entry: str, module: str, code: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kt_bench.methods]\n{entry}\n")


def test_entry_points_register_classes_and_modules(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "kt_ep_class", "ep_class = kt_ep_class_mod:EPMethod",
                       "kt_ep_class_mod", """
        from kt_bench import Method

        class EPMethod(Method):
            '''Registered by its entry point's name.'''
            default_weight = 3.0
        """)
    _fake_distribution(site, "kt_ep_module", "ep_module = kt_ep_module_mod", "kt_ep_module_mod",
                       PLUGIN.format(name="ep_self_registered"))
    monkeypatch.syspath_prepend(str(site))
    load_entry_points()
    assert build_method("ep_class").weight == 3.0
    assert "ep_self_registered" in METHODS
    for mod in ("kt_ep_class_mod", "kt_ep_module_mod"):
        sys.modules.pop(mod, None)


def test_entry_point_that_fails_to_load_is_one_line(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "kt_ep_broken", "broken = kt_ep_broken_mod:Missing",
                       "kt_ep_broken_mod", "x = 1\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="entry point 'broken = kt_ep_broken_mod:Missing'"):
        load_entry_points()
    sys.modules.pop("kt_ep_broken_mod", None)


def test_duplicate_plugin_name_is_an_error_naming_both_files(tmp_path):
    write_plugin(tmp_path / "a", "one.py", "twin")
    second = write_plugin(tmp_path / "b", "two.py", "twin")
    load_plugin_dir(tmp_path / "a")
    with pytest.raises(PluginError) as exc:
        load_plugin_dir(tmp_path / "b")
    msg = str(exc.value)
    assert "duplicate method name 'twin'" in msg
    assert str(tmp_path / "a" / "one.py") in msg and str(second) in msg


def test_plugin_shadowing_a_builtin_is_an_error(tmp_path):
    write_plugin(tmp_path, "kd_again.py", "kd")
    with pytest.raises(PluginError, match=r"duplicate method name 'kd': defined in .*kd\.py"):
        load_plugin_dir(tmp_path)


def test_plugin_that_fails_to_import_names_the_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_module_anywhere\n")
    with pytest.raises(PluginError) as exc:
        load_plugin_dir(tmp_path)
    assert str(exc.value) == (f"plugin {bad} failed to import: ModuleNotFoundError: "
                              "No module named 'no_such_module_anywhere'")


def test_missing_plugin_folder_is_an_error(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin_dir(tmp_path / "nope")


def test_unknown_method_lists_known_methods():
    with pytest.raises(UnknownNameError) as exc:
        build_method("kd+nst_cubic")
    assert str(exc.value).startswith("unknown method 'nst_cubic'")
    assert "known: " + ", ".join(BUILTIN) in str(exc.value)


def test_unknown_method_option_lists_accepted_options():
    with pytest.raises(ConfigError, match=r"unknown option 'temperature' for method 'kd'; "
                                          r"accepted: weight, T"):
        build_method("kd", {"kd": {"temperature": 2}})


def test_combination_sums_members_terms_with_their_own_weights():
    method = build_method("kd+nst_poly", {"nst_poly": {"weight": 10.0}, "kd": {"T": 2.0}})
    assert isinstance(method, CombinedMethod)
    assert method.taps == ("logits", "feat")
    assert method.term_weights(0, 10) == {"kd": 1.0, "nst_poly": 10.0}
    taps_s = {"logits": torch.randn(4, 5), "feat": torch.randn(4, 3, 2, 2)}
    taps_t = {"logits": torch.randn(4, 5), "feat": torch.randn(4, 6, 2, 2)}
    terms = method.loss_terms(taps_s, taps_t, BATCH)
    kd = build_method("kd", {"kd": {"T": 2.0}}).loss_terms(taps_s, taps_t, BATCH)["kd"]
    nst = build_method("nst_poly").loss_terms(taps_s, taps_t, BATCH)["nst_poly"]
    assert terms["kd"].item() == pytest.approx(kd.item())
    assert terms["nst_poly"].item() == pytest.approx(nst.item())
    assert method.describe()["kd"]["T"] == 2.0


def test_combination_naming_a_member_twice_is_an_error():
    with pytest.raises(ConfigError, match="names a member twice"):
        build_method("kd+kd")


def test_fitnet_two_stage_is_declared_by_the_plugin():
    one = build_method("fitnet")
    assert one.term_weights(0, 10) == {"fitnet": 100.0} and one.ce_scale(0, 10) == 1.0
    two = build_method("fitnet", {"fitnet": {"hint_epochs": 3}})
    assert two.taps == ("stage2", "logits")
    assert two.term_weights(2, 10) == {"fitnet": 100.0, "fitnet.kd": 0.0}
    assert two.ce_scale(2, 10) == 0.0
    assert two.term_weights(3, 10) == {"fitnet": 0.0, "fitnet.kd": 1.0}
    assert two.ce_scale(3, 10) == 1.0


# Models and datasets: one decorator each, options read from the signature by resolve_options

DATASET_PLUGIN = '''
import torch
from kt_bench.data import DatasetInfo, Split, TensorData, register_dataset


def _info(num_classes: int = 2, n_train: int = 8) -> DatasetInfo:
    return DatasetInfo(num_classes, 1, 4, n_train)


@register_dataset("{name}", {info})
def tiny(data_root=None, num_classes: int = 2, n_train: int = 8, n_test: int = 4) -> TensorData:
    """Four-pixel images of {{num_classes}} classes."""
    def split(n):
        return Split(torch.zeros(n, 1, 4, 4), torch.arange(n) % num_classes)
    return TensorData("{name}", split(n_train), split(n_test), num_classes)
'''


@pytest.fixture
def forget():
    """Names registered by a test, (registry, name) pairs, unregistered after it."""
    names: list[tuple[Registry, str]] = []
    yield names
    for registry, name in names:
        registry.unregister(name)


def _tiny_info(num_classes: int = 2, n_train: int = 8):
    from kt_bench.data import DatasetInfo

    return DatasetInfo(num_classes, 1, 4, n_train)


def _tiny_load(data_root=None, num_classes: int = 2, n_train: int = 8, n_test: int = 4):
    """Zero images of ``num_classes`` classes."""
    from kt_bench.data import Split, TensorData

    def split(n):
        return Split(torch.zeros(n, 1, 4, 4), torch.arange(n) % num_classes)

    return TensorData("tiny", split(n_train), split(n_test), num_classes)


def test_a_dataset_entry_holds_its_loader_and_its_info(forget):
    from kt_bench.data import DATASETS, DatasetEntry, dataset_info, load_dataset, register_dataset

    forget.append((DATASETS, "reg_tiny"))
    assert register_dataset("reg_tiny", info=_tiny_info)(_tiny_load) is _tiny_load
    entry = DATASETS.get("reg_tiny")
    assert isinstance(entry, DatasetEntry)
    assert entry.load is _tiny_load and entry.info is _tiny_info
    assert DATASETS.origin("reg_tiny") == __file__ and entry.__doc__ == _tiny_load.__doc__
    spec = {"name": "reg_tiny", "num_classes": 3, "n_test": 6}
    assert dataset_info(spec).num_classes == 3 and dataset_info(spec).n_train == 8
    data = load_dataset(spec)
    assert (data.num_classes, data.n_train, data.n_test) == (3, 8, 6)
    # the same definition registered again (a module imported twice) is no duplicate
    register_dataset("reg_tiny", info=_tiny_info)(_tiny_load)


def test_a_dataset_without_an_info_function_is_a_clear_error():
    from kt_bench.data import DATASETS, register_dataset

    with pytest.raises(PluginError) as exc:
        register_dataset("no_info")(_tiny_load)
    msg = str(exc.value)
    assert msg == (f"dataset 'no_info' (from {__file__}) has no info function; accepted: "
                   "@register_dataset('no_info', info=f) where f(**options) returns a "
                   "DatasetInfo(num_classes, in_channels, image_size, n_train)")
    with pytest.raises(PluginError, match=r"dataset 'bad_info' \(from .*\): info = 3 is not "
                                          r"a function; accepted: f\(\*\*options\) returning "
                                          r"a DatasetInfo"):
        register_dataset("bad_info", info=3)(_tiny_load)
    with pytest.raises(PluginError, match="decorates the loader"):
        register_dataset("not_a_loader", info=_tiny_info)("oops")
    assert not {"no_info", "bad_info", "not_a_loader"} & set(DATASETS.names())


def test_an_info_option_the_loader_lacks_is_an_error():
    from kt_bench.data import DATASETS, register_dataset

    def info(num_classes: int = 2, colour: bool = False):
        raise AssertionError("never called")

    with pytest.raises(PluginError, match=r"its info function takes option\(s\) the loader "
                                          r"does not: colour; accepted: num_classes, n_train, "
                                          r"n_test"):
        register_dataset("odd_info", info=info)(_tiny_load)
    assert "odd_info" not in DATASETS


def test_a_plugin_file_without_an_info_function_names_the_file(tmp_path):
    from kt_bench.data import DATASETS

    path = tmp_path / "data_plugin.py"
    path.write_text(DATASET_PLUGIN.format(name="file_no_info", info=""))
    with pytest.raises(PluginError) as exc:
        load_plugin_dir(tmp_path)
    assert str(exc.value).startswith(f"plugin {path}: dataset 'file_no_info' (from {path}) "
                                     "has no info function")
    assert "\n" not in str(exc.value) and "file_no_info" not in DATASETS


def test_unknown_option_of_a_plugin_dataset_lists_the_accepted_ones(tmp_path, forget):
    from kt_bench.data import DATASETS, dataset_info, load_dataset

    forget.append((DATASETS, "file_tiny"))
    (tmp_path / "data_plugin.py").write_text(DATASET_PLUGIN.format(name="file_tiny",
                                                                   info="info=_info"))
    load_plugin_dir(tmp_path)
    expected = ("unknown option 'colour' for dataset 'file_tiny'; accepted: num_classes, "
                "n_train, n_test")
    for read in (load_dataset, dataset_info):
        with pytest.raises(ConfigError) as exc:
            read({"name": "file_tiny", "colour": True})
        assert str(exc.value) == expected
    # an option of the loader's that the info function does not take is accepted by both
    assert dataset_info({"name": "file_tiny", "n_test": 2}).n_train == 8
    with pytest.raises(ConfigError, match=r"dataset 'file_tiny': option n_train = 'x' is "
                                          r"invalid; accepted: an integer"):
        dataset_info({"name": "file_tiny", "n_train": "x"})


MODEL_PLUGIN = '''
from torch import nn
from kt_bench.models import register_model


@register_model("{name}")
def build(num_classes: int, in_channels: int = 3, width: int = 4) -> nn.Module:
    """A linear model on pooled pixels."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(in_channels, num_classes))
    model.tap_map = {{"pool": "1"}}
    return model
'''


def test_unknown_option_of_a_plugin_model_lists_the_accepted_ones(tmp_path, forget):
    from kt_bench.models import MODELS, build_model

    forget.append((MODELS, "file_linear"))
    path = tmp_path / "model_plugin.py"
    path.write_text(MODEL_PLUGIN.format(name="file_linear"))
    load_plugin_dir(tmp_path)
    assert MODELS.origin("file_linear") == str(path)
    assert build_model("file_linear", 5, 1)(torch.zeros(2, 1, 4, 4)).shape == (2, 5)
    with pytest.raises(ConfigError) as exc:
        build_model({"name": "file_linear", "depth": 3}, 5)
    assert str(exc.value) == "unknown option 'depth' for model 'file_linear'; accepted: width"


def test_a_model_builder_must_take_the_classes_and_channels():
    from kt_bench.models import MODELS, register_model

    def no_channels(num_classes: int, width: int = 4):
        raise AssertionError("never called")

    with pytest.raises(PluginError, match=r"model 'no_channels' \(from .*\): its builder does "
                                          r"not take in_channels; accepted: "
                                          r"f\(num_classes, in_channels, \*\*options\)"):
        register_model("no_channels")(no_channels)
    with pytest.raises(PluginError, match="@register_model decorates a builder"):
        register_model("not_a_builder")(42)
    assert not {"no_channels", "not_a_builder"} & set(MODELS.names())


@pytest.mark.parametrize("package", ["kt_bench.models", "kt_bench.data"])
def test_every_module_of_a_builtin_package_registers_without_a_list(package):
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    registry = pkg.MODELS if package.endswith("models") else pkg.DATASETS
    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)
               if not m.name.startswith("_")} - set(pkg.INFRASTRUCTURE)
    assert modules and all(f"{package}.{m}" in sys.modules for m in modules)
    from kt_bench.core.registry import origin_of

    origins = {Path(registry.origin(n)).stem for n in registry.names()}
    origins |= {Path(origin_of(f.resolve)).stem for f in registry.families()}
    assert modules <= origins  # every module registered something (a name or a family)


def test_import_modules_imports_all_but_private_and_skipped_ones(tmp_path, monkeypatch):
    from kt_bench.core.registry import import_modules

    pkg = tmp_path / "kt_tmp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("b_model", "a_model", "_private", "infra"):
        (pkg / f"{name}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_modules("kt_tmp_pkg", [str(pkg)], ("infra",)) == ["a_model", "b_model"]
        assert "kt_tmp_pkg.a_model" in sys.modules and "kt_tmp_pkg.infra" not in sys.modules
    finally:
        for mod in [m for m in sys.modules if m.startswith("kt_tmp_pkg")]:
            sys.modules.pop(mod)
