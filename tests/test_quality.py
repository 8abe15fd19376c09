"""The medzoo recipes and what they change in the saved model: EMA / SWA weights, test-time
augmentation inside every export, seed ensembles as one bundle (synthetic MedMNIST-format data)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_export import EVERY_ARCH

from zoo.bundle import load_bundle
from zoo.card import read_card
from zoo.cli import main
from zoo.data.synthetic import write_synthetic_medmnist
from zoo.ensemble import combine
from zoo.inference import load_splits, predict_logits
from zoo.models import get_spec
from zoo.postprocess import to_probs
from zoo.preprocess.adapter import FlipTTA, InputAdapter
from zoo.recipe import ANY, RecipeError, apply_overrides, find_recipe, load_recipe_file, recipe_dir
from zoo.runtime import OnnxModel
from zoo.train import train
from zoo.train.checkpoint import Progress, RunDir
from zoo.train.engine import _finish, make_preprocessing
from zoo.train.loop import Session, end_epoch, eval_model, evaluate, train_epoch

MEDZOO = ("medzoo-28", "medzoo-224")
TINY = {"epochs": 1, "batch_size": 4, "train.max_batches": 1, "train.eval_batch_size": 8, "pretrained": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic BreastMNIST (grey, 2 classes), DermaMNIST (RGB, 7) and OrganAMNIST (grey, 11) at 28 px."""
    root = tmp_path_factory.mktemp("quality_data")
    write_synthetic_medmnist(root, "breastmnist", 28, (64, 16, 16), seed=3)
    write_synthetic_medmnist(root, "dermamnist", 28, (12, 4, 4), seed=4)
    write_synthetic_medmnist(root, "organamnist", 28, (12, 4, 4), seed=5)
    return root


def _recipe(dataset: str, arch: str, name: str = "medzoo-28", **overrides: Any) -> Any:
    return apply_overrides(find_recipe(dataset, arch, recipe=name), overrides)


# --- the recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEDZOO)
def test_medzoo_recipes_validate_and_cite_their_sources(name: str) -> None:
    recipe = load_recipe_file(recipe_dir() / f"{name}.yaml")
    assert recipe.name == name and recipe.dataset == ANY and recipe.arch == ANY and recipe.report == "medzoo"
    for source in ("MedMNIST v2", "MedMNIST+", "AdamW", "label smoothing", "SWA", "ResNet strikes back"):
        assert source in recipe.citation, source
    assert recipe.optimizer.name == "adamw" and recipe.scheduler.name == "cosine"
    assert recipe.scheduler.warmup_epochs > 0 and recipe.loss.label_smoothing > 0
    assert recipe.averaging.method == "ema"
    # the 224 px variant extends the 28 px one: same families, its own size and stem
    assert recipe.data.size == (224 if name == "medzoo-224" else 28)
    assert recipe.model_by_arch["resnet18"]["stem"] == ("imagenet" if name == "medzoo-224" else "small")


def test_augmentation_and_tta_follow_the_modality() -> None:
    breast = find_recipe("breast", "resnet18", recipe="medzoo-28").for_dataset("breast")
    assert breast.augment.hflip_p > 0 and breast.augment.vflip_p == 0 and breast.tta == ["hflip"]
    # chosen on validation AUC: small rotations, shifts / zooms and brightness / contrast, no balancing
    assert breast.augment.rotation_p > 0 and breast.augment.affine_p > 0 and breast.augment.jitter_p > 0
    assert breast.augment.saturation == 0 and not breast.train.balance  # grey-scale: no saturation
    organ = find_recipe("organa", "resnet18", recipe="medzoo-28").for_dataset("organa")
    # OrganAMNIST names sides (kidney-left / kidney-right): never flipped, not in training nor at test time
    assert organ.augment.hflip_p == organ.augment.vflip_p == 0 and organ.tta == [] and not organ.train.balance
    path = find_recipe("path", "resnet18", recipe="medzoo-28").for_dataset("path")
    assert path.augment.rot90_p > 0 and path.augment.saturation > 0 and path.tta == ["hflip", "vflip"]
    # no family (MNIST, image folders): small rotations and shifts only; flips could change the label
    mnist = find_recipe("mnist", "lenet", recipe="medzoo-28").for_dataset("mnist")
    assert mnist.augment.rotation_p > 0 and mnist.augment.hflip_p == mnist.augment.vflip_p == 0 and mnist.tta == []
    # 224 px keeps the same families: augmentation, flips and TTA
    big = find_recipe("breast", "resnet18", recipe="medzoo-224").for_dataset("breast")
    assert big.augment == breast.augment and big.tta == ["hflip"] and big.data.size == 224
    big_path = find_recipe("path", "resnet18", recipe="medzoo-224").for_dataset("path")
    assert big_path.augment.fill == "reflection" and big_path.augment.rot90_p > 0


def test_recipe_names_and_errors() -> None:
    assert find_recipe("breast", "resnet18", recipe="medzoo-28").name == "medzoo-28:resnet18"
    assert find_recipe("breast", "resnet18").name == "medmnist-v2:resnet18"  # the default stays v2
    assert find_recipe("path", "resnet18", recipe="path-resnet18").name == "path-resnet18"
    with pytest.raises(RecipeError, match="medzoo-28"):
        find_recipe("breast", "resnet18", recipe="medzoo28")
    with pytest.raises(RecipeError, match="pathmnist"):
        find_recipe("breast", "resnet18", recipe="path-resnet18")
    with pytest.raises(RecipeError, match="seeds"):
        find_recipe("breast", "ensemble", recipe="medzoo-28")


def test_cosine_warmup_steps_per_batch() -> None:
    from zoo.train.optim import build_optimizer, build_scheduler

    recipe = _recipe("breast", "simplecnn")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], recipe.optimizer)
    sched, when = build_scheduler(opt, recipe.scheduler, epochs=10, steps_per_epoch=4, lr=recipe.optimizer.lr)
    assert when == "batch"
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = int(recipe.scheduler.warmup_epochs * 4)
    lr = recipe.optimizer.lr
    assert lrs[0] == pytest.approx(lr * recipe.scheduler.warmup_start_factor)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1 : warm + 1]))  # warm-up rises to lr
    assert lrs[warm] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # then decays
    assert opt.param_groups[0]["lr"] == pytest.approx(recipe.scheduler.min_lr, abs=1e-9)


# the ensemble is made by --seeds; ResNet-152 takes ResNet-50's settings (medzoo-28.yaml) and modules (test_export)
ARCHS = [a for a in EVERY_ARCH if not get_spec(a).example_kwargs]


@pytest.mark.parametrize("arch", ARCHS)
def test_medzoo_recipe_trains_a_step_of_every_architecture(arch: str, data: Path, tmp_path: Path) -> None:
    spec = get_spec(arch)
    size = 28 if spec.accepts(28) else spec.sizes()[0]  # AlexNet needs 63 px or more: --input-size 64
    recipe = _recipe("derma", arch, **TINY, **({"data.input_size": size} if size != 28 else {}))
    result = train(recipe, data_root=data, store=tmp_path, progress=False, download=False)
    card = result.card
    assert card.recipe["name"] == f"medzoo-28:{arch}" and card.training.augment_family == "dermatoscopy"
    assert card.tta == ["hflip", "vflip"] and card.training.weights.startswith("ema")
    assert np.isfinite(card.metrics.history[0]["train_loss"])
    load_bundle(result.bundle)


def test_medzoo_224_trains_a_step(tmp_path: Path) -> None:
    write_synthetic_medmnist(tmp_path / "data", "breastmnist", 224, (8, 4, 4))
    recipe = _recipe("breast", "resnet18", "medzoo-224", **TINY)
    card = train(recipe, data_root=tmp_path / "data", store=tmp_path, progress=False, download=False).card
    assert card.preprocessing.input_size == 224 and card.model_kwargs == {"stem": "imagenet"}


# --- EMA and SWA: what is validated, selected and saved ---------------------------------------------------


def _session(data: Path, **overrides: Any) -> Session:
    recipe = _recipe("breast", "simplecnn", **{"epochs": 2, "batch_size": 16, **overrides})
    splits = load_splits(recipe, data, download=False)
    recipe = recipe.for_dataset(splits.name)
    torch.manual_seed(recipe.train.seed)
    return Session.create(recipe, splits, make_preprocessing(recipe, splits), torch.device("cpu"), False)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_ema_weights_are_validated_selected_and_saved(data: Path, tmp_path: Path) -> None:
    s = _session(data)
    assert s.averager is not None
    steps = 64 // 16
    assert s.averager.decay ** (s.recipe.averaging.half_life_epochs * steps) == pytest.approx(0.5)
    p = Progress()
    row = end_epoch(s, p, 0, train_epoch(s))
    raw, ema = _state(s.net), _state(s.averager.avg.module)
    assert p.best_epoch == 1 and set(p.best_state) == set(raw)
    for k in raw:  # the selected weights are the EMA's, buffers (BatchNorm statistics) included
        assert torch.equal(p.best_state[k], ema[k]), k
    assert not torch.equal(ema["conv1.0.weight"], raw["conv1.0.weight"])
    assert not torch.equal(ema["conv1.1.running_mean"], raw["conv1.1.running_mean"])
    # the validation row is the EMA network's, through the recipe's TTA
    _, val, _ = evaluate(s, s.splits.val, eval_model(s, s.averager.avg.module))
    assert row["val_auc"] == pytest.approx(val["auc"]) and row["val_acc"] == pytest.approx(val["acc"])
    with RunDir(tmp_path / "runs", "ema", False) as run:
        bundle = _finish(s, p, run, tmp_path, 1.0)
    saved = load_file(str(bundle / "model.safetensors"))
    for k in raw:
        assert torch.equal(saved[k], ema[k]), k
    assert not torch.equal(saved["fc1.weight"], raw["fc1.weight"])
    assert read_card(bundle).training.weights.startswith("ema (decay")


def test_swa_averages_epochs_and_recomputes_batchnorm(data: Path) -> None:
    from torch.optim.swa_utils import update_bn

    from zoo.preprocess.adapter import full_model

    s = _session(data, epochs=3, **{"averaging.method": "swa", "averaging.swa_start": 0.34})
    p = Progress()
    raws = []
    for epoch in range(3):
        loss = train_epoch(s)
        raws.append(_state(s.net))
        end_epoch(s, p, epoch, loss)
    avg = s.averager.avg
    assert int(avg.n_averaged) == 2  # epochs 2 and 3 (swa_start 0.34 of 3 epochs)
    for name, param in avg.module.named_parameters():
        torch.testing.assert_close(param.detach(), (raws[1][name] + raws[2][name]) / 2)
    # BatchNorm statistics are those of the averaged weights on the training images
    ref = copy.deepcopy(avg.module)
    batches = [s.train_x[i : i + 128] for i in range(0, len(s.train_x), 128)]
    with torch.no_grad():
        update_bn(batches, full_model(ref, s.prep))
    torch.testing.assert_close(avg.module.conv1[1].running_mean, ref.conv1[1].running_mean)
    assert not torch.allclose(avg.module.conv1[1].running_mean, raws[2]["conv1.1.running_mean"])


def test_ema_run_resumes_bit_identically(data: Path, tmp_path: Path) -> None:
    recipe = _recipe("breast", "simplecnn", epochs=2, batch_size=16)
    full = train(recipe, data_root=data, store=tmp_path / "a", progress=False, download=False)

    class Stop(Exception):
        pass

    def stop_after_first(row: dict[str, Any]) -> None:
        raise Stop

    with pytest.raises(Stop):
        train(recipe, data_root=data, store=tmp_path / "b", progress=False, download=False, on_epoch=stop_after_first)
    resumed = train(recipe, data_root=data, store=tmp_path / "b", progress=False, download=False, resume=True)
    assert resumed.card.weights_sha256 == full.card.weights_sha256


# --- test-time augmentation inside the model --------------------------------------------------------------


@pytest.fixture(scope="module")
def tta_bundle(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = _recipe("breast", "simplecnn", epochs=1, batch_size=16)
    return train(recipe, data_root=data, store=tmp_path_factory.mktemp("tta"), progress=False, download=False).bundle


def test_tta_is_in_the_bundle_and_flip_invariant(tta_bundle: Path) -> None:
    b = load_bundle(tta_bundle)
    assert b.card.tta == ["hflip"] and isinstance(b.model[1], FlipTTA)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        out, flipped = b.model(x), b.model(x.flip(-1))
        z = InputAdapter(b.card.preprocessing)(x)
        by_hand = (b.net(z) + b.net(z.flip(-1))) / 2
    torch.testing.assert_close(out, flipped, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-5)
    assert not torch.allclose(b.net(z), b.net(z.flip(-1)), atol=1e-4)  # the network alone is not invariant


def test_tta_travels_inside_the_onnx_export(tta_bundle: Path, data: Path) -> None:
    from export.exporter import export_bundle

    records = export_bundle(tta_bundle, formats=["onnx"], data_root=data)
    assert records["onnx"]["parity"]["passed"]
    model = OnnxModel.open(tta_bundle)
    assert model.meta.tta == ["hflip"]
    x = np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(x), model.predict(x[..., ::-1].copy()), atol=1e-5)
    with torch.no_grad():
        expected = load_bundle(tta_bundle).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-4)


def test_no_tta_where_flips_change_the_label(data: Path, tmp_path: Path) -> None:
    card = train(_recipe("organa", "simplecnn", **TINY), data_root=data, store=tmp_path, progress=False,
                 download=False).card
    assert card.tta == [] and card.training.augment_family == "ct"
    assert not isinstance(load_bundle(card_path(tmp_path, card.id)).model[1], FlipTTA)


def card_path(store: Path, bundle_id: str) -> Path:
    return store / "bundles" / bundle_id


# --- seed ensembles: one bundle ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_ensemble(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``zoo train breast simplecnn --recipe medzoo-28 --seeds 2`` through the CLI."""
    store = tmp_path_factory.mktemp("ensemble_store")
    argv = ["--store", str(store), "train", "breast", "simplecnn", "--recipe", "medzoo-28", "--seeds", "2",
            "--epochs", "2", "--batch-size", "16", "--data-root", str(data), "--offline", "--json"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    out = json.loads(buf.getvalue())
    return {"store": store, "out": out, "bundle": Path(out["bundle"])}


def test_seed_ensemble_card_lists_members(seed_ensemble: dict[str, Any]) -> None:
    card = read_card(seed_ensemble["bundle"])
    assert card.arch == "ensemble" and card.ensemble is not None and card.ensemble.combine == "mean of logits"
    members = card.ensemble.members
    assert [m.seed for m in members] == [0, 1] and [m["seed"] for m in seed_ensemble["out"]["members"]] == [0, 1]
    for m in members:
        own = read_card(seed_ensemble["store"] / "bundles" / m.id)
        assert own.arch == "simplecnn" and own.recipe["train"]["seed"] == m.seed
        assert m.val.auc == own.metrics.val.auc and m.best_epoch == own.metrics.best_epoch
        assert m.weights_sha256 == own.weights_sha256
    assert card.tta == ["hflip"] and card.recipe["train"]["seeds"] == 2
    assert (seed_ensemble["bundle"] / "curves.png").is_file() and "seed ensemble of 2" in (
        seed_ensemble["bundle"] / "README.md").read_text()


def test_seed_ensemble_logits_are_the_mean_of_its_members(seed_ensemble: dict[str, Any], data: Path) -> None:
    ens = load_bundle(seed_ensemble["bundle"])
    members = [load_bundle(seed_ensemble["store"] / "bundles" / m.id) for m in ens.card.ensemble.members]
    images = load_splits(_recipe("breast", "simplecnn"), data, download=False).val.images
    logits = predict_logits(ens.model, images).numpy()
    member_logits = [predict_logits(m.model, images).numpy() for m in members]
    np.testing.assert_allclose(logits, np.mean(member_logits, axis=0), atol=1e-5)
    combined = combine(member_logits)  # the one ensemble rule of serving and `zoo score --ensemble`
    np.testing.assert_allclose(to_probs(logits), combined.probs, atol=1e-5)
    # validation metrics in the card are the ensemble's own
    from zoo.metrics import compute_metrics

    val = compute_metrics(load_splits(_recipe("breast", "simplecnn"), data, download=False).val.labels.numpy(),
                          to_probs(logits), ens.labels)
    assert ens.card.metrics.val.auc == pytest.approx(val["auc"])


def test_seed_ensemble_exports_with_parity_and_scores(seed_ensemble: dict[str, Any], data: Path,
                                                     tmp_path: Path) -> None:
    bundle = seed_ensemble["bundle"]
    assert main(["--store", str(seed_ensemble["store"]), "export", str(bundle), "--data-root", str(data)]) == 0
    card = read_card(bundle)
    assert card.exports["onnx"].parity["passed"] and card.exports["torchscript"].parity["passed"]
    images = load_splits(_recipe("breast", "simplecnn"), data, download=False).test.images.numpy()[:10]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate(images):
        Image.fromarray(arr[0], "L").save(folder / f"img_{i:02d}.png")
    out = tmp_path / "scores.csv"
    assert main(["--store", str(seed_ensemble["store"]), "score", str(folder), "--model", str(bundle),
                 "--out", str(out), "--workers", "0"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"img_{i:02d}.png" for i in range(10)]
    probs = np.array([[float(r[f"prob_{lab}"]) for lab in card.labels] for r in rows])
    with torch.no_grad():
        expected = to_probs(load_bundle(bundle).model(torch.from_numpy(images)).numpy())
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert {r["model_id"] for r in rows} == {card.id}


def test_resume_keeps_finished_members(seed_ensemble: dict[str, Any], data: Path) -> None:
    """An interrupted `--seeds` run goes on: finished members are reused, not trained again."""
    store = seed_ensemble["store"]
    before = {p.name for p in (store / "bundles").iterdir()}
    first = read_card(seed_ensemble["bundle"])
    argv = ["--store", str(store), "train", "breast", "simplecnn", "--recipe", "medzoo-28", "--seeds", "2",
            "--epochs", "2", "--batch-size", "16", "--data-root", str(data), "--offline", "--json", "--resume"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    again = read_card(Path(json.loads(buf.getvalue())["bundle"]))
    assert [m.id for m in again.ensemble.members] == [m.id for m in first.ensemble.members]
    assert {p.name for p in (store / "bundles").iterdir()} - before == {again.id}  # only the new ensemble
    assert again.weights_sha256 == first.weights_sha256


def test_selection_last_keeps_the_last_epoch(data: Path) -> None:
    s = _session(data, **{"train.early_stopping.metric": "last"})
    p = Progress()
    for epoch in range(2):
        end_epoch(s, p, epoch, train_epoch(s))
    assert p.best_epoch == 2
    for k, v in _state(s.averager.avg.module).items():
        assert torch.equal(p.best_state[k], v), k


def test_a_recipe_file_extends_a_built_in_one(tmp_path: Path) -> None:
    mine = tmp_path / "my-recipe.yaml"
    mine.write_text("extends: medzoo-28\nname: my-recipe\ntrain: {epochs: 7}\n"
                    "families: {ultrasound: {augment: {hflip_p: 0.25}}}\n")
    recipe = load_recipe_file(mine)
    base = load_recipe_file(recipe_dir() / "medzoo-28.yaml")
    assert recipe.name == "my-recipe" and recipe.train.epochs == 7
    assert recipe.train.batch_size == base.train.batch_size and recipe.optimizer == base.optimizer  # merged
    assert recipe.families["ultrasound"].augment.hflip_p == 0.25
    assert recipe.families["ultrasound"].tta == ["hflip"] and recipe.families["ct"] == base.families["ct"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: medzoo-29\nname: bad\n")
    with pytest.raises(RecipeError, match="medzoo-28"):
        load_recipe_file(bad)
    # `zoo train … --recipe FILE` takes it for any dataset × architecture
    from zoo.cli import build_parser
    from zoo.cli.commands import recipe_from_args

    args = build_parser().parse_args(["train", "breast", "simplecnn", "--recipe", str(mine), "--seeds", "3"])
    r = recipe_from_args(args)
    assert (r.name, r.arch, r.dataset, r.train.seeds) == ("my-recipe:simplecnn", "simplecnn", "breast", 3)
