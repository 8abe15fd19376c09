"""The recipe files in zoo/recipes/: they validate, cite their report, and resolve as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zoo.recipe import (
    ANY,
    Recipe,
    RecipeError,
    all_recipes,
    apply_overrides,
    find_recipe,
    load_recipe_file,
    recipe_files,
)

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
PROTOCOL = "medmnist-v2"
FILES = recipe_files()
# Classes per dataset of the recipes (for building each recipe's network).
NUM_CLASSES = {"derma": 7, "path": 9, "organa": 11, "mnist": 10, "isic2019": 8, "binaryskin": 2}


def _report_text(report: str) -> str:
    found = sorted(SEEDS.glob(f"{report}_*.txt"))
    assert found, f"no report file {report}_*.txt in {SEEDS}"
    return found[0].read_text(encoding="utf-8")


def _norm(text: str) -> str:
    """Report text with its spacing collapsed (numbers are searched in it)."""
    return re.sub(r"\s+", " ", text)


def test_there_are_recipes() -> None:
    names = {p.stem for p in FILES}
    assert PROTOCOL in names
    expected = {
        "derma-mlp", "derma-lenet", "derma-resnet18",
        "mnist-simplecnn_v1", "mnist-simplecnn",
        "path-simplecnn", "path-alexnet", "path-alexnet_bn", "path-resnet18", "path-resnet152",
        "path-xception",
        "organa-mlp", "organa-mlp-nohidden", "organa-mlp-1hidden", "organa-mlp-leakyrelu",
        "organa-mlp-tanh", "organa-mlp-l1l2", "organa-mlp-nonorm", "organa-mlp-128",
        "organa-mlp-big128", "organa-cnn28", "organa-cnn128", "organa-resnet50_tl",
        "isic2019-isic_cnn", "isic2019-resnet50",
        "binaryskin-lenet_binary", "binaryskin-alexnet_nbase", "binaryskin-alexnet_nbase-hinge",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_file_is_valid(path: Path) -> None:
    from zoo.models import list_models

    recipe = load_recipe_file(path)
    assert isinstance(recipe, Recipe)
    assert path.name == recipe.name + ".yaml"
    assert recipe.citation.strip()
    assert recipe.arch == ANY or recipe.arch in list_models()
    if recipe.dataset == ANY:  # a protocol: MedMNIST v2's, or medzoo's own
        assert recipe.report in (PROTOCOL, "medzoo") and recipe.arch == ANY
    else:
        assert re.fullmatch(r"00[0-4]", recipe.report), recipe.report
        dataset, variant = recipe.name.split("-", 1)
        assert dataset == recipe.dataset
        assert variant.split("-", 1)[0] == recipe.arch  # <dataset>-<arch>[-<variant>]
    assert recipe.reported.metric
    value = recipe.reported.value
    assert value is None or 0.0 < value <= 1.0  # a fraction, not a percentage
    if value is None:
        assert recipe.reported.note  # then the note says what the report shows instead


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_report_exists_and_number_is_the_reports(path: Path) -> None:
    if not SEEDS.parent.is_dir():
        pytest.skip(f"{SEEDS.parent} (the reports) is not available")
    recipe = load_recipe_file(path)
    if recipe.dataset == ANY:
        return
    text = _norm(_report_text(recipe.report))
    value = recipe.reported.value
    if value is None:
        return
    # The report's own number: as a percentage (74.47, 98.9) or a fraction (0.658).
    candidates = {f"{value * 100:.2f}", f"{value * 100:.1f}", f"{value:.3f}", f"{value:.4f}"}
    candidates = {c for c in candidates if float(c) in (round(value * 100, 2), round(value, 4))}
    assert any(c in text for c in candidates), (recipe.name, sorted(candidates))


OWN = [p for p in FILES if load_recipe_file(p).dataset != ANY]


@pytest.mark.parametrize("path", OWN, ids=[p.stem for p in OWN])
def test_recipe_builds_its_network(path: Path) -> None:
    """Model kwargs and input size are accepted by the architecture (built on the meta device)."""
    import torch

    from zoo.models import create_model

    recipe = load_recipe_file(path)
    classes = 1 if recipe.loss.name in ("bce", "hinge") else NUM_CLASSES[recipe.dataset]
    channels = recipe.data.channels or (1 if recipe.dataset in ("organa", "mnist") else 3)
    with torch.device("meta"):
        net = create_model(
            recipe.arch, num_classes=classes, in_channels=channels,
            input_size=recipe.input_size, pretrained=False, **recipe.model_kwargs(),
        )
        out = net(torch.zeros(2, channels, recipe.input_size, recipe.input_size))
    assert tuple(out.shape) == (2, classes)


def test_every_recipe_is_found_by_its_name() -> None:
    pairs = set()
    for recipe in all_recipes():
        if recipe.dataset == ANY:
            continue
        dataset, variant = recipe.name.split("-", 1)
        assert find_recipe(dataset, variant).name == recipe.name
        pairs.add((dataset, recipe.arch))
    # every (dataset, arch) has a default recipe named <dataset>-<arch>
    for dataset, arch in sorted(pairs):
        assert find_recipe(dataset, arch).name == f"{dataset}-{arch}"


def test_find_recipe() -> None:
    assert find_recipe("derma", "mlp").name == "derma-mlp"
    assert find_recipe("skin", "mlp").name == "derma-mlp"  # an alias of the same dataset
    l1l2 = find_recipe("organa", "mlp-l1l2")
    assert l1l2.name == "organa-mlp-l1l2" and l1l2.arch == "mlp"
    assert (l1l2.loss.l1, l1l2.loss.l2) == (0.000183, 0.0015)
    assert find_recipe("organa", "mlp").name == "organa-mlp"
    assert find_recipe("path", "resnet18").name == "path-resnet18"
    assert find_recipe("isic2019", "resnet50").name == "isic2019-resnet50"
    assert find_recipe("binaryskin", "alexnet_nbase-hinge").loss.name == "hinge"


def test_find_recipe_falls_back_to_the_protocol() -> None:
    recipe = find_recipe("breast", "resnet18")
    assert recipe.report == PROTOCOL
    assert recipe.arch == "resnet18" and recipe.dataset == "breast"
    assert recipe.model_kwargs() == {"stem": "small"}
    assert recipe.optimizer.name == "adam" and recipe.optimizer.lr == 0.001
    assert recipe.scheduler.name == "multistep" and recipe.scheduler.gamma == 0.1
    assert recipe.scheduler.milestones == [0.5, 0.75]
    assert (recipe.train.epochs, recipe.train.batch_size) == (100, 128)
    assert recipe.train.early_stopping.metric == "auc"
    assert recipe.train.early_stopping.patience is None
    assert not recipe.augment.enabled
    # a dataset with recipes, but not for this architecture
    assert find_recipe("derma", "resnet50").report == PROTOCOL
    assert find_recipe("derma", "simplecnn").model_kwargs() == {}


def test_find_recipe_unknown_architecture() -> None:
    with pytest.raises(RecipeError):
        find_recipe("breast", "no-such-net")


def test_apply_overrides() -> None:
    base = find_recipe("derma", "mlp")
    recipe = apply_overrides(base, {"epochs": "3", "lr": "1e-3", "model.hidden": "[64]"})
    assert recipe.train.epochs == 3
    assert recipe.optimizer.lr == pytest.approx(1e-3)
    assert recipe.model["hidden"] == [64]
    assert recipe.model["batchnorm"] is True  # the other model kwargs stay
    assert recipe.optimizer.name == base.optimizer.name
    assert base.train.epochs != 3  # the original is untouched
    dotted = apply_overrides(base, {"train.batch_size": 16, "data.val_fraction": "0.1"})
    assert dotted.train.batch_size == 16 and dotted.data.val_fraction == 0.1
    # typed values as given (a tuning trial's): text is not read as YAML, a model keyword may be new
    typed = apply_overrides(base, {"model.activation": "null", "optimizer.lr": 0.01}, parse_text=False)
    assert typed.model["activation"] == "null" and typed.optimizer.lr == 0.01
    assert apply_overrides(base, {"model.activation": "null"}).model["activation"] is None  # text: YAML


@pytest.mark.parametrize(
    "overrides",
    [{"optimizer": "foo"}, {"epochs": "0"}, {"size": "100"}, {"train.no_such_field": 1}],
)
def test_bad_override_raises(overrides: dict[str, object]) -> None:
    with pytest.raises(RecipeError):
        apply_overrides(find_recipe("derma", "mlp"), overrides)
