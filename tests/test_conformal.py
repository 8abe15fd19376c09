"""Prediction sets (split conformal prediction) and calibration chosen by evidence.

What these tests assert is what the methods guarantee or what medzoo promises, never an effect a
re-run can flip: the numpy rule that answers equals crepes' conformal classifier; sets are nested
in α and never empty; the card keeps what any α needs; a bundle gets sets from ``zoo calibrate``;
``zoo score`` and ``zoo.load(...).predict`` give the same sets for the same images; an ensemble of
two identical members has its member's sets. Coverage on real data is measured by
``bench/bench_conformal.py`` (docs/BENCHMARKS.md), not asserted here.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from crepes import ConformalClassifier
from PIL import Image

import zoo
from zoo.card import ConformalInfo, read_card, write_card
from zoo.cli import main
from zoo.errors import UsageError
from zoo.postprocess import conformity_scores, prediction_sets, set_labels, softmax
from zoo.trust.conformal import RAPS_K, RAPS_LAMBDA, fit_conformal, min_images_per_class, true_scores


def _probs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded probabilities of a k-class model that is right more often than not, and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5
    return softmax(logits).astype(np.float32), labels


def _crepes_sets(cal_probs: np.ndarray, cal_y: np.ndarray, probs: np.ndarray, score: str, mondrian: bool,
                 alpha: float) -> np.ndarray:
    """(N, K) bool sets from crepes' own p-values (non-smoothed; per class when Mondrian, as crepes'
    ``WrapClassifier(class_cond=True)`` computes them), the predicted class kept: the reference.
    crepes computes each p-value in a Python loop (seconds per thousand images), so answers and the
    cross-validation use the vectorised rule."""
    cc = ConformalClassifier().fit(true_scores(cal_probs, cal_y, score), bins=cal_y if mondrian else None)
    s = conformity_scores(probs, score, RAPS_LAMBDA, RAPS_K)
    if mondrian:
        p = np.stack([cc.predict_p(s, bins=np.full(len(s), k), smoothing=False)[:, k] for k in range(s.shape[1])], 1)
    else:
        p = cc.predict_p(s, smoothing=False)
    out = p >= alpha
    out[np.arange(len(s)), probs.argmax(axis=1)] = True
    return out


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_the_numpy_rule_is_crepes_conformal_classifier(score: str, mondrian: bool) -> None:
    cal_p, cal_y = _probs(300, 4, 0)
    test_p, _ = _probs(200, 4, 1)
    info = fit_conformal(cal_p, cal_y, 4)
    info = info.model_copy(update={"score": score, "mondrian": mondrian, "scores": _scores(cal_p, cal_y, info,
                                                                                          score, mondrian)})
    for alpha in (0.02, 0.1, 0.3):
        expected = _crepes_sets(cal_p.astype(np.float64), cal_y, test_p.astype(np.float64), score, mondrian, alpha)
        np.testing.assert_array_equal(prediction_sets(test_p, info, alpha), expected)


def _scores(p: np.ndarray, y: np.ndarray, info: ConformalInfo, score: str, mondrian: bool) -> list[list[float]]:
    from zoo.postprocess import calibration_scores

    return calibration_scores(p.astype(np.float64), y, score, mondrian, info.raps_lambda, info.raps_k)


def test_sets_are_nested_never_empty_and_cover_everything_below_one_over_n() -> None:
    cal_p, cal_y = _probs(120, 5, 2)
    info = fit_conformal(cal_p, cal_y, 5)
    test_p, _ = _probs(300, 5, 3)
    sets = {a: prediction_sets(test_p, info, a) for a in (0.005, 0.05, 0.1, 0.2, 0.5)}
    for small, large in zip(list(sets)[:-1], list(sets)[1:]):
        assert (sets[small] >= sets[large]).all()  # a smaller α never drops a class
    assert all(s[np.arange(300), test_p.argmax(1)].all() for s in sets.values())  # the predicted class is in
    # with 120 calibration images no p-value is below 1/121: at α < that, every class is plausible
    assert sets[0.005].all()
    members = np.flatnonzero(sets[0.1][0])
    assert set_labels(sets[0.1][0], test_p[0], list("abcde"))[0] == "abcde"[int(test_p[0].argmax())]
    assert len(set_labels(sets[0.1][0], test_p[0], list("abcde"))) == len(members)


def test_mondrian_only_when_every_class_can_honour_the_level() -> None:
    need = min_images_per_class(0.05)
    assert need == 19  # a class of n images can be left out of a set only at α ≥ 1 / (n + 1)
    p, y = _probs(400, 3, 4)
    assert fit_conformal(p, y, 3).mondrian
    rare = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[: need - 1]])
    info = fit_conformal(p[rare], y[rare], 3)
    assert not info.mondrian and "class 2 has 18 validation images" in info.why and len(info.scores) == 1


def test_a_trained_bundle_carries_sets_and_the_choice_of_calibration(breast_bundle: Path) -> None:
    card = read_card(breast_bundle)
    conf, cal = card.conformal, card.calibration
    assert conf is not None and cal is not None
    assert conf.alpha == 0.1 and conf.mondrian  # BreastMNIST validation: 21 malignant, 57 benign images
    assert [len(s) for s in conf.scores] == [21, 57] and all(s == sorted(s) for s in conf.scores)
    sizes = {k: v["mean_set_size"] for k, v in conf.candidates.items()}
    assert conf.score == min(sizes, key=lambda k: (round(sizes[k], 6), ["lac", "aps", "raps"].index(k)))
    assert {"val", "test"} <= set(conf.metrics) and 0 < conf.metrics["test"]["coverage"] <= 1
    assert cal.kind == min(cal.candidates, key=cal.candidates.get)  # the lowest cross-validated NLL
    assert (breast_bundle / conf.validation_file).is_file() and conf.validation_sha256
    readme = (breast_bundle / "README.md").read_text()
    assert "## Prediction sets" in readme and cal.choice in readme


@pytest.fixture(scope="module")
def twenty(breast_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real BreastMNIST test images as PNG files."""
    folder = tmp_path_factory.mktemp("twenty")
    images = np.load(breast_root / "breastmnist.npz")["test_images"][:20]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_zoo_score_and_predict_give_the_same_sets(breast_bundle: Path, twenty: Path, tmp_path: Path,
                                                  alpha: float | None) -> None:
    files = sorted(twenty.glob("*.png"))
    answers = zoo.load(breast_bundle).predict(files, alpha=alpha)
    assert all(a.prediction_set and a.prediction_set[0] == a.label for a in answers)
    assert {a.alpha for a in answers} == {alpha or 0.1}
    assert answers[0].as_dict()["prediction_set"] == list(answers[0].prediction_set)
    out = tmp_path / "scores.csv"
    extra = [] if alpha is None else ["--alpha", str(alpha)]
    assert main(["score", str(twenty), "-m", str(breast_bundle), "-o", str(out), "--workers", "0", "--no-progress",
                 *extra]) == 0
    with open(out, newline="") as f:
        rows = {r["path"]: r["prediction_set"].split("|") for r in csv.DictReader(f)}
    assert rows == {f.name: list(a.prediction_set) for f, a in zip(files, answers, strict=True)}


def test_a_bad_alpha_is_a_clear_error(breast_bundle: Path, twenty: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = zoo.load(breast_bundle)
    for bad in (0, 1, -0.1, "much"):
        with pytest.raises(UsageError, match="alpha must be"):
            model.predict(sorted(twenty.glob("*.png"))[:1], alpha=bad)  # type: ignore[arg-type]
    assert main(["score", str(twenty), "-m", str(breast_bundle), "-o", str(tmp_path / "x.csv"), "--alpha", "1.5",
                 "--workers", "0", "--no-progress"]) == 2
    assert "alpha must be strictly between 0 and 1" in capsys.readouterr().err


def test_a_bundle_made_before_sets_gets_them_from_zoo_calibrate(breast_bundle: Path, breast_root: Path,
                                                                 tmp_path: Path, twenty: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / breast_bundle.name
    shutil.copytree(breast_bundle, old)
    card = read_card(old)
    (old / card.conformal.validation_file).unlink()
    raw = card.to_json_dict()
    del raw["conformal"]  # a card written before this change has no such key
    raw["calibration"] = {k: raw["calibration"][k] for k in ("method", "temperature", "threshold", "metrics")}
    (old / "card.json").write_text(json.dumps(raw))
    legacy = read_card(old)
    assert legacy.conformal is None and legacy.calibration.kind == "temperature"  # old cards: temperature scaling
    write_card(old, legacy)
    assert zoo.load(old).predict(sorted(twenty.glob("*.png"))[:1])[0].prediction_set is None
    assert main(["calibrate", str(old), "--data-root", str(breast_root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conformal"]["scores"] and read_card(old).conformal is not None
    assert zoo.load(old).predict(sorted(twenty.glob("*.png"))[:1])[0].prediction_set


def test_an_ensemble_of_identical_members_has_its_members_sets(breast_bundle: Path, tmp_path: Path,
                                                               twenty: Path) -> None:
    from zoo.ensemble import ensemble_conformal

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(breast_bundle, a)
    shutil.copytree(breast_bundle, b)
    card = read_card(a)
    conf = ensemble_conformal([a, b / "model.onnx"], [card, read_card(b)])
    assert conf is not None and conf.score == card.conformal.score and conf.mondrian == card.conformal.mondrian
    np.testing.assert_allclose(np.concatenate(conf.scores), np.concatenate(card.conformal.scores), atol=1e-6)
    files = sorted(twenty.glob("*.png"))
    single = zoo.load(breast_bundle).predict(files)
    both = zoo.load([a, b], ensemble=True).predict(files)
    assert [p.prediction_set for p in both] == [p.prediction_set for p in single]
    (b / card.conformal.validation_file).write_bytes(b"changed")  # no longer what the card's sha256 says
    assert ensemble_conformal([a, b], [card, read_card(b)]) is None


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dirichlet_calibration_answers_as_scikit_learn_fitted_it(k: int) -> None:
    """What the card stores (W, b) gives exactly scikit-learn's probabilities, for a single logit,
    2 and 4 logits; the choice is the candidate of lowest cross-validated NLL, all of them listed."""
    from sklearn.linear_model import LogisticRegression

    from zoo.postprocess import calibrated_probs, to_probs
    from zoo.trust.calibration import KINDS, choose_calibration, fit_kind

    rng = np.random.default_rng(k)
    n_classes = max(k, 2)
    y = rng.integers(0, n_classes, 300)
    logits = rng.normal(size=(300, k)) * 3
    if k == 1:
        logits[:, 0] += (2 * y - 1) * 2
    else:
        logits[np.arange(300), y] += 2
    cal = fit_kind("dirichlet", logits, y, n_classes)
    logp = np.log(np.clip(to_probs(logits).astype(np.float64), 1e-12, 1))
    expected = LogisticRegression(C=1.0, max_iter=2000).fit(logp, y).predict_proba(logp)
    np.testing.assert_allclose(calibrated_probs(logits, cal), expected, atol=1e-5)
    chosen = choose_calibration(logits, y, n_classes)
    assert set(chosen.candidates) == set(KINDS) and chosen.kind == min(chosen.candidates, key=chosen.candidates.get)
    assert chosen.kind in chosen.choice


def test_too_few_images_of_a_class_keeps_the_network_s_probabilities() -> None:
    from zoo.trust.calibration import choose_calibration

    y = np.array([0] * 30 + [1])
    logits = np.random.default_rng(0).normal(size=(31, 2))
    info = choose_calibration(logits, y, 2)
    assert info.kind == "none" and info.temperature == 1.0 and "class 1 has 1 validation image" in info.choice
