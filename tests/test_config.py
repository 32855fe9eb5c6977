"""Grid files: loading, validation and one-line errors that name the file and the key."""

import pytest

from kt_bench.core.errors import ConfigError, KtBenchError, UnknownNameError
from kt_bench.sweep.config import Recipe, load_grid

from .conftest import write_tiny_grid


def test_builtin_demo_grid_loads_with_its_eight_methods():
    grid = load_grid("demo")
    assert grid.methods == ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly",
                            "nst_gauss", "kd+nst_poly"]
    assert grid.datasets[0].name == "digits"
    # the teacher recipe inherits from the students' recipe, replacing only what it sets
    assert grid.teacher_recipe.epochs == 20 and grid.teacher_recipe.lr == grid.recipe.lr


def test_tiny_grid_file_loads(tiny_grid):
    grid = load_grid(str(tiny_grid))
    assert grid.name == "tiny" and grid.recipe == Recipe(epochs=2, batch_size=32, lr=0.05)


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return str(path)


@pytest.mark.parametrize("old,new,message", [
    ("epochs = 2\nbatch", "epochs = \"ten\"\nbatch", "recipe.epochs must be an integer, got 'ten'"),
    ("lr = 0.05", "lr = -1.0", "recipe.lr = -1.0 is invalid; accepted: a number > 0"),
    ("lr = 0.05", "learning_rate = 0.05", "recipe: unknown key 'learning_rate'; accepted: epochs,"),
    ('schedule = "cosine"', 'schedule = "linear"',
     "recipe.schedule = 'linear' is invalid; accepted: one of cosine, multistep, constant"),
    ("seeds = [0]", "seed = [0]", "unknown key 'seed'; accepted: name, description, datasets"),
    ('methods = ["student", "kd"]', 'methods = ["student", "kdd"]',
     "unknown method 'kdd' (did you mean 'kd'?); known: ab, at, cc, crd, dist, dkd, fitnet,"),
    ('name = "synthetic"', 'name = "mnist"',
     "unknown dataset 'mnist'; known: cifar10, cifar100, digits, hf, imagefolder, imagenet, "
     "stl10, synthetic, tiny_imagenet"),
    ("width = 0.25", "depth = 2", "unknown option 'depth' for model 'resnet8'; accepted: width"),
    ('name = "tiny"', 'name = "tiny', "invalid TOML"),
    ("[[pairs]]\nteacher", "[[pairs]]\nmentor",
     "pairs[0] must be a table with the keys teacher and student"),
])
def test_malformed_grid_is_a_one_line_error_naming_file_and_key(tmp_path, old, new, message):
    path = _edit(write_tiny_grid(tmp_path), old, new)
    with pytest.raises(KtBenchError) as exc:
        load_grid(path)
    text = str(exc.value)
    assert text.startswith(path) and message in text and "\n" not in text


def test_unknown_grid_lists_the_builtin_ones():
    with pytest.raises(ConfigError, match=r"unknown grid 'demoo' \(did you mean 'demo'\?\); "
                                          r"known: crd-cifar100, crd-cifar100-hetero, demo, "
                                          r"hetero-cifar100, hetero-digits, "
                                          r"imagenet-r34-r18, imagenet-r34-r18-b256, "
                                          r"imagenet-r34-r18-b512, paper, paper-cifar, "
                                          r"paper-imagenet, paper-mini; or a path to a \.toml"):
        load_grid("demoo")


def test_unknown_method_option_in_grid_names_the_file(tmp_path):
    path = write_tiny_grid(tmp_path)
    path.write_text(path.read_text() + "\n[method_options.kd]\ntemp = 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown option 'temp' for method 'kd'"):
        load_grid(str(path))


def test_missing_grid_file_is_named():
    with pytest.raises(ConfigError, match="nowhere.toml: no such file"):
        load_grid("nowhere.toml")


def test_unknown_name_errors_keep_their_type(tmp_path):
    path = _edit(write_tiny_grid(tmp_path), '"kd"]', '"nope"]')
    with pytest.raises(UnknownNameError):
        load_grid(path)


def test_composite_grid_includes_others_and_rejects_cycles(tmp_path):
    from kt_bench.sweep.cells import expand

    write_tiny_grid(tmp_path)
    (tmp_path / "both.toml").write_text('name = "both"\ninclude = ["tiny.toml", "demo"]\n')
    grid = load_grid(str(tmp_path / "both.toml"))
    cells = expand(grid)
    assert len(cells) == 2 + 3 * 8 and {c.grid for c in cells} == {"both"}
    assert {c.recipe.epochs for c in cells} == {2, 12}  # each part keeps its own recipe
    (tmp_path / "loop.toml").write_text('name = "loop"\ninclude = ["loop.toml"]\n')
    with pytest.raises(ConfigError, match="include 'loop.toml' forms a cycle"):
        load_grid(str(tmp_path / "loop.toml"))
    (tmp_path / "bad.toml").write_text('name = "bad"\ninclude = ["demo"]\nseeds = [1]\n')
    with pytest.raises(ConfigError, match="unknown key 'seeds' in a grid with 'include'"):
        load_grid(str(tmp_path / "bad.toml"))
