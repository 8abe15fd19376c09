"""The parity check: an exported file must give the logits of the PyTorch model it came from.

Reference: ``bundle.model`` (``Sequential(InputAdapter, net)``, float32, eager, CPU) through
:func:`zoo.inference.predict_logits`. Inputs: batches of :data:`BATCH_SIZES` (1, a prime, 64)
taken from the bundle's own test split when its data are found, else deterministic random uint8
images (seed :data:`RANDOM_SEED`); with data, the whole test split is also run.

Numbers, per batch size, for the whole split and over everything:

* ``max_abs_diff`` = max |exported − reference| over all logits;
* ``max_rel_diff`` = ``max_abs_diff`` / max(max |reference|, 1e-12): the error relative to the
  scale of the logits (an elementwise ratio explodes on logits near zero);
* ``argmax_agreement``: fraction of images with the same predicted class
  (:func:`zoo.postprocess.predicted_class`, the one rule, single-logit heads included);
* ``near_ties``: disagreements on images whose reference top-2 margin is within the fp32
  tolerance band 2·max(ABS_TOL, REL_TOL·max|reference|): both answers are right to within the
  tolerance we accept, so they are listed but not counted against fp32 parity.

Pass criteria. fp32 (``onnx``, ``torchscript``, ``pt2``): finite logits of the right shape, metadata equal
to the card, ``max_abs_diff ≤ ABS_TOL`` **or** ``max_rel_diff ≤ REL_TOL`` over all inputs, and
100 % argmax agreement (near ties excepted) on every input set. fp16 (``onnx_fp16``): finite
logits, metadata, argmax agreement ≥ FP16_MIN_AGREEMENT on the real test split (on the parity
batches when no data were found) and, as a sanity bound against a wrong graph or weight,
``max_rel_diff ≤ FP16_REL_TOL``.

A bundle with an out-of-distribution detector also has its ``ood_score`` checked, on every parity
image (batches and split), against the eager ``ScoredModel``: the score within a tolerance relative
to its scale and the same in/out flag at the card's threshold (:func:`ood_tolerance`,
:func:`_check_ood`; the report's ``ood_score`` section states the rule and the numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.pt2_export import load_pt2
from export.torchscript_export import load_torchscript
from zoo.card import Card
from zoo.errors import DataUnavailableError, ParityError
from zoo.inference import bundle_splits, predict_logits
from zoo.postprocess import predicted_class
from zoo.runtime import OOD_OUTPUT, OnnxModel, RuntimeOptions

log = logging.getLogger(__name__)

ABS_TOL = 1e-4
REL_TOL = 1e-3
FP16_MIN_AGREEMENT = 0.995
FP16_REL_TOL = 0.05  # sanity bound: float16 rounding gives ~1e-3, a wrong weight gives ~1
OOD_REL_TOL = 1e-3  # of the ood_score's scale, max(1, max|eager|): ood_tolerance() says why
BATCH_SIZES: tuple[int, ...] = (1, 7, 64)
RANDOM_SEED = 0
CHUNK = 256  # images per call when a whole split is run
_EPS = 1e-12
LOGITS = "logits"
# metadata entries that must equal the card's (labels, preprocessing, identity)
_META_KEYS = ("id", "arch", "labels", "task", "num_outputs", "preprocessing", "weights_sha256", "dataset")


@dataclass
class ParityInputs:
    """uint8 batches (one per batch size) and, with data, the whole real test split."""

    batch_sizes: list[int]
    batches: list[np.ndarray]
    split: np.ndarray | None
    source: str


@dataclass
class Reference:
    """PyTorch eager logits (and out-of-distribution scores, for a bundle with a detector) for the
    parity inputs."""

    batches: list[np.ndarray]
    split: np.ndarray | None
    ood_batches: list[np.ndarray] | None = None
    ood_split: np.ndarray | None = None

    @classmethod
    def of(cls, bundle: Any, inputs: ParityInputs) -> Reference:
        if bundle.scored is None:
            def logits(x: np.ndarray) -> np.ndarray:
                return predict_logits(bundle.model, torch.from_numpy(x), CHUNK, "cpu").numpy()

            return cls([logits(x) for x in inputs.batches], None if inputs.split is None else logits(inputs.split))

        @torch.no_grad()
        def both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # ScoredModel runs bundle.model itself: its logits are the served model's
            parts = [bundle.scored(torch.from_numpy(x[i : i + CHUNK])) for i in range(0, len(x), CHUNK)]
            return torch.cat([p[0] for p in parts]).float().numpy(), torch.cat([p[1] for p in parts]).numpy()

        runs = [both(x) for x in inputs.batches]
        split = None if inputs.split is None else both(inputs.split)
        return cls([r[0] for r in runs], None if split is None else split[0], [r[1] for r in runs],
                   None if split is None else split[1])


def _test_images(bundle: Any, data_root: str | Path | None) -> tuple[np.ndarray, str] | None:
    """The bundle's real test split (uint8), or ``None`` when its data are not found.

    With an explicit ``data_root`` a failure is an error (the user asked for real images).
    """
    try:
        splits = bundle_splits(bundle.card, data_root, download=False)
    except DataUnavailableError:
        if data_root is not None:
            raise
        log.info("no data for %s: parity on random images", bundle.id)
        return None
    except (ValueError, KeyError, TypeError, OSError) as e:
        if data_root is not None:
            raise ValueError(f"cannot use the test split of {bundle.id} from {data_root}: {e}") from None
        log.info("data of %s unusable (%s): parity on random images", bundle.id, e)
        return None
    images = splits.test.images.numpy()
    prep = bundle.preprocessing
    if images.dtype != np.uint8 or images.shape[1:] != (prep.in_channels, prep.image_size, prep.image_size):
        raise ValueError(f"the test split of {bundle.id} has images {tuple(images.shape[1:])} {images.dtype}, "
                         f"the model takes uint8 {(prep.in_channels, prep.image_size, prep.image_size)}")
    if len(images) == 0:
        return None
    return np.ascontiguousarray(images), f"test split of {splits.name} ({len(images)} images)"


def parity_inputs(bundle: Any, data_root: str | Path | None = None,
                  batch_sizes: Sequence[int] = BATCH_SIZES) -> ParityInputs:
    """Real test images when available (consecutive, wrapping around), else random uint8."""
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError("parity batch sizes must be positive")
    prep = bundle.preprocessing
    real = _test_images(bundle, data_root)
    if real is not None:
        images, source = real
        batches, start = [], 0
        for b in sizes:
            batches.append(images[(start + np.arange(b)) % len(images)])
            start += b
        return ParityInputs(sizes, batches, images, source)
    rng = np.random.default_rng(RANDOM_SEED)
    shape = (prep.in_channels, prep.image_size, prep.image_size)
    batches = [rng.integers(0, 256, size=(b, *shape), dtype=np.uint8) for b in sizes]
    return ParityInputs(sizes, batches, None, f"random uint8 images (seed {RANDOM_SEED})")


def _margin(logits: np.ndarray) -> np.ndarray:
    """How far each row is from changing its predicted class."""
    if logits.shape[1] == 1:
        return 2 * np.abs(logits[:, 0])
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Differences between exported and reference logits (see the module docstring)."""
    if out.shape != ref.shape:
        return {"n": int(ref.shape[0]), "shape": list(out.shape), "expected_shape": list(ref.shape), "finite": False}
    finite = bool(np.isfinite(out).all())
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    agree = predicted_class(out) == predicted_class(ref)
    band = 2 * max(ABS_TOL, REL_TOL * scale)
    ties = ~agree & (_margin(ref.astype(np.float64)) <= band)
    n = int(ref.shape[0])
    return {
        "n": n,
        "finite": finite,
        "max_abs_diff": max_abs if finite else None,
        "max_rel_diff": max_abs / max(scale, _EPS) if finite else None,
        "max_abs_logit": scale,
        "argmax_agreement": float(agree.mean()) if n else 1.0,
        "near_ties": int(ties.sum()),
        "disagreements": int((~agree & ~ties).sum()),
    }


Outputs = Callable[[np.ndarray], dict[str, np.ndarray]]


def _open(fmt: str, path: Path, options: RuntimeOptions | None,
          n_outputs: int) -> tuple[Outputs, str, dict[str, Any], list[str]]:
    """outputs function, provider, metadata and interface problems of an exported file."""
    if fmt == "torchscript":
        ts = load_torchscript(path)
        return ts.outputs, ts.provider, ts.meta.model_dump(), []
    if fmt == "pt2":
        ep = load_pt2(path)
        return ep.outputs, ep.provider, ep.meta.model_dump(), []
    model = OnnxModel.open(path, options)
    problems = []
    inp, out = model.session.get_inputs(), model.session.get_outputs()
    if len(inp) != 1 or inp[0].type != "tensor(uint8)":
        problems.append(f"input is {[i.type for i in inp]}, not one tensor(uint8)")
    elif isinstance(inp[0].shape[0], int):
        problems.append(f"batch axis is fixed at {inp[0].shape[0]}, not dynamic")
    if len(out) != n_outputs or any(o.type != "tensor(float)" for o in out):
        problems.append(f"outputs are {[o.type for o in out]}, not {n_outputs} tensor(float)")
    return model.outputs, model.provider, model.meta.model_dump(), problems


def ood_tolerance(reference: np.ndarray, fp16: bool) -> tuple[float, float]:
    """``(score scale, tolerance)`` for the ``ood_score`` of a set of eager reference scores.

    The score is in units of the validation spread of the distance (each layer's distance is
    standardised by its validation standard deviation, then averaged): on the organ default model
    of issue 18 the test images score −1…3.7 (median |score| 0.5) and the threshold is 1.29. The
    scale is max(1, max|eager score|): one unit, or the largest score when larger, since the
    float32 error of a sum of squares grows with the sum. fp32 tolerance: :data:`OOD_REL_TOL` of
    that scale. Why that size: the graph computes ‖(f − c) W‖² in float32 from features that ONNX
    Runtime and PyTorch compute with different kernels, and the whitening multiplies their
    difference by up to cond(W) ≤ 1e3 (``zoo.trust.ood.EIGEN_FLOOR``); measured, 2.9e-5 of the scale
    on that model (17,850 images) and 1.1e-4 on a detector conditioned at 1e6 (the floor's limit,
    ``tests/test_export.py``), so 1e-3 leaves a 9× margin at worst; and 1e-3 of a validation
    standard deviation is far below any difference a decision could notice (the flag is checked
    on its own, :func:`_check_ood`), while a wrong graph, layer or statistic moves scores by a
    sizeable fraction of a unit. fp16: the logits' sanity bound :data:`FP16_REL_TOL` of the scale."""
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    return scale, (FP16_REL_TOL if fp16 else OOD_REL_TOL) * scale


def _check_ood(got: list[np.ndarray | None], reference: list[np.ndarray], threshold: float,
               fp16: bool) -> tuple[dict[str, Any], list[str]]:
    """The exported ``ood_score`` against eager on every parity image (batches and split).

    fp32: every score within the tolerance of :func:`ood_tolerance`, and the same in/out flag at
    the card's threshold, except for images whose eager score lies within that tolerance of the
    threshold (both flags are then right to within what we accept; ``near_threshold``, as near
    ties are for the logits). fp16, as its logits: flag agreement (near-threshold flips excepted)
    ≥ :data:`FP16_MIN_AGREEMENT`, and a sanity bound on the median difference: features rounded to
    11 bits, amplified by the whitening, move some images' scores by about the tolerance (organ
    default model: median 1.7 %, 99th percentile 5.2 %, max 6.6 % of the scale), while a wrong
    graph or statistic moves every image's score by whole units."""
    if any(g is None for g in got):
        return {"passed": False}, ["no ood_score output, though the bundle has a detector"]
    out = np.concatenate([np.asarray(g, dtype=np.float64).reshape(-1) for g in got])
    ref = np.concatenate([r.astype(np.float64).reshape(-1) for r in reference])
    if out.shape != ref.shape or not np.isfinite(out).all():
        return {"passed": False}, [f"ood_score of shape {list(out.shape)} (expected {list(ref.shape)}) or not finite"]
    scale, tol = ood_tolerance(ref, fp16)
    diff = np.abs(out - ref)
    flip = (out > threshold) != (ref > threshold)
    near = flip & (np.abs(ref - threshold) <= tol)
    agreement = float(1 - (flip & ~near).mean()) if ref.size else 1.0
    worst = float(diff.max(initial=0.0))
    report = {
        "n": int(ref.size), "max_abs_diff": worst, "max_rel_diff": worst / scale,
        "median_abs_diff": float(np.median(diff)) if ref.size else 0.0,
        "p99_abs_diff": float(np.quantile(diff, 0.99)) if ref.size else 0.0, "score_scale": scale, "tolerance": tol,
        "threshold": threshold, "flag_agreement": agreement, "near_threshold": int(near.sum()),
        "disagreements": int((flip & ~near).sum()), "rel_tol": FP16_REL_TOL if fp16 else OOD_REL_TOL,
        "rule": (f"flag agreement >= {FP16_MIN_AGREEMENT} (eager scores within the tolerance of the threshold "
                 "excepted); median |exported - eager| <= tolerance" if fp16 else
                 "max |exported - eager| <= tolerance; same flag at the threshold except eager scores within the "
                 "tolerance of it") + "; tolerance = rel_tol * max(1, max|eager|), in validation standard deviations",
    }
    problems = []
    if fp16:
        if agreement < FP16_MIN_AGREEMENT:
            problems.append(f"in/out-of-distribution flag agreement {agreement:.2%} < {FP16_MIN_AGREEMENT:.1%}")
        if report["median_abs_diff"] > tol:
            problems.append(f"ood_score median difference {report['median_abs_diff']:.3g} > {tol:.3g}")
    else:
        if report["max_abs_diff"] > tol:
            problems.append(f"ood_score differs from eager by {report['max_abs_diff']:.3g} > {tol:.3g} "
                            f"({OOD_REL_TOL:g} of the score scale {scale:.3g})")
        if report["disagreements"]:
            problems.append(f"{report['disagreements']} in/out-of-distribution flag disagreement(s) at the "
                            f"threshold {threshold:.4g}")
    report["passed"] = not problems
    return report, problems


def _run_all(outputs: Outputs, images: np.ndarray) -> dict[str, np.ndarray]:
    parts = [outputs(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _overall(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate of several compare() results (all logits together)."""
    n = sum(p["n"] for p in parts)
    finite = all(p.get("finite") for p in parts)
    max_abs = max(p["max_abs_diff"] for p in parts) if finite else None
    scale = max(p["max_abs_logit"] for p in parts) if finite else 0.0
    return {
        "n": n,
        "finite": finite,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(scale, _EPS) if max_abs is not None else None,
        "max_abs_logit": scale,
        "argmax_agreement": sum(p["argmax_agreement"] * p["n"] for p in parts) / max(n, 1) if finite else 0.0,
        "near_ties": sum(p.get("near_ties", 0) for p in parts),
        "disagreements": sum(p.get("disagreements", 0) for p in parts),
    }


def _logit_problems(overall: dict[str, Any], split: dict[str, Any] | None, fp16: bool) -> list[str]:
    """The logits' pass criteria (module docstring) applied to the aggregated numbers."""
    problems = []
    if fp16:
        judged = split if split is not None else overall
        if judged["argmax_agreement"] < FP16_MIN_AGREEMENT:
            problems.append(f"argmax agreement {judged['argmax_agreement']:.2%} < {FP16_MIN_AGREEMENT:.1%}")
        if overall["max_rel_diff"] > FP16_REL_TOL:
            problems.append(f"max rel diff {overall['max_rel_diff']:.3g} > {FP16_REL_TOL:g}")
        return problems
    if overall["max_abs_diff"] > ABS_TOL and overall["max_rel_diff"] > REL_TOL:
        problems.append(f"max abs diff {overall['max_abs_diff']:.3g} > {ABS_TOL:g} and max rel diff "
                        f"{overall['max_rel_diff']:.3g} > {REL_TOL:g}")
    if overall["disagreements"]:
        problems.append(f"{overall['disagreements']} argmax disagreement(s)")
    return problems


def _criterion(fp16: bool, split: bool) -> dict[str, Any]:
    if fp16:
        return {"min_argmax_agreement": FP16_MIN_AGREEMENT, "rel_tol": FP16_REL_TOL,
                "agreement_on": "test split" if split else "parity batches"}
    return {"abs_tol": ABS_TOL, "rel_tol": REL_TOL, "min_argmax_agreement": 1.0,
            "rule": "max_abs_diff <= abs_tol or max_rel_diff <= rel_tol; near ties excepted from agreement"}


def check_file(fmt: str, path: Path, card: Card, inputs: ParityInputs, reference: Reference,
               options: RuntimeOptions | None = None) -> dict[str, Any]:
    """Open one exported file (with all of its load-time checks, on ONNX Runtime with ``options``) and
    measure it against eager."""
    scored = reference.ood_batches is not None
    outputs, provider, meta, problems = _open(fmt, Path(path), options, 2 if scored else 1)
    expected = card.export_meta(fmt).model_dump()
    problems += [f"metadata {k} differs from the card" for k in _META_KEYS if meta.get(k) != expected.get(k)]
    got = [outputs(x) for x in inputs.batches]
    batches = {str(b): compare(o[LOGITS], ref) for b, o, ref in zip(inputs.batch_sizes, got, reference.batches,
                                                                    strict=True)}
    split = split_out = None
    if inputs.split is not None and reference.split is not None:
        split_out = _run_all(outputs, inputs.split)
        split = compare(split_out[LOGITS], reference.split)
    sets = list(batches.values()) + ([split] if split is not None else [])
    overall = _overall(sets)
    fp16 = fmt == "onnx_fp16"
    for name, s in [*batches.items(), ("split", split)]:
        if s is not None and "shape" in s:
            problems.append(f"logits of shape {s['shape']} at {name}, expected {s['expected_shape']}")
    if not overall["finite"] and not any("shape" in s for s in sets):
        problems.append("non-finite logits")
    if overall["finite"]:
        problems += _logit_problems(overall, split, fp16)
    ood = None
    if scored:
        assert reference.ood_batches is not None and card.ood is not None
        ood_got, ood_ref = [o.get(OOD_OUTPUT) for o in got], list(reference.ood_batches)
        if split_out is not None and reference.ood_split is not None:
            ood_got.append(split_out.get(OOD_OUTPUT))
            ood_ref.append(reference.ood_split)
        ood, ood_problems = _check_ood(ood_got, ood_ref, card.ood.threshold, fp16)
        problems += ood_problems
    parity = {
        "reference": "PyTorch eager float32 on cpu",
        "inputs": inputs.source,
        "batch_sizes": inputs.batch_sizes,
        **{k: overall[k] for k in ("max_abs_diff", "max_rel_diff", "max_abs_logit", "argmax_agreement", "near_ties")},
        "batches": batches,
        "split": split,
        "ood_score": ood,
        "relative": "max|exported - eager| / max|eager| over the logits compared",
        "criterion": _criterion(fp16, split is not None),
        "problems": problems,
        "passed": not problems,
    }
    return {"provider": provider, "parity": parity}


def raise_on_failure(bundle_id: str, reports: dict[str, dict[str, Any]], consequence: str) -> None:
    """Raise :class:`ParityError` naming every format whose check failed and why."""
    failed = {fmt: r["parity"] for fmt, r in reports.items() if not r["parity"]["passed"]}
    if failed:
        reasons = "; ".join(f"{fmt}: {', '.join(p['problems']) or 'failed'}" for fmt, p in failed.items())
        raise ParityError(f"parity check failed for {', '.join(failed)} of {bundle_id}: {reasons}; {consequence}")


__all__ = ["ABS_TOL", "BATCH_SIZES", "FP16_MIN_AGREEMENT", "FP16_REL_TOL", "OOD_REL_TOL", "REL_TOL", "ParityError",
           "ParityInputs", "Reference", "check_file", "compare", "ood_tolerance", "parity_inputs", "raise_on_failure"]
