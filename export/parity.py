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

Pass criteria. fp32 (``onnx``, ``torchscript``): finite logits of the right shape, metadata equal
to the card, ``max_abs_diff ≤ ABS_TOL`` **or** ``max_rel_diff ≤ REL_TOL`` over all inputs, and
100 % argmax agreement (near ties excepted) on every input set. fp16 (``onnx_fp16``): finite
logits, metadata, argmax agreement ≥ FP16_MIN_AGREEMENT on the real test split (on the parity
batches when no data were found) and, as a sanity bound against a wrong graph or weight,
``max_rel_diff ≤ FP16_REL_TOL``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.torchscript_export import load_torchscript
from zoo.card import Card
from zoo.errors import DataUnavailableError, ParityError
from zoo.inference import bundle_splits, predict_logits
from zoo.postprocess import predicted_class
from zoo.runtime import OOD_OUTPUT, OnnxModel

log = logging.getLogger(__name__)

ABS_TOL = 1e-4
REL_TOL = 1e-3
FP16_MIN_AGREEMENT = 0.995
FP16_REL_TOL = 0.05  # sanity bound: float16 rounding gives ~1e-3, a wrong weight gives ~1
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

    @classmethod
    def of(cls, bundle: Any, inputs: ParityInputs) -> Reference:
        def run(x: np.ndarray) -> np.ndarray:
            return predict_logits(bundle.model, torch.from_numpy(x), CHUNK, "cpu").numpy()

        ood = None
        if bundle.scored is not None:
            with torch.no_grad():
                ood = [bundle.scored(torch.from_numpy(x))[1].numpy() for x in inputs.batches]
        return cls([run(x) for x in inputs.batches], None if inputs.split is None else run(inputs.split), ood)


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


Predict = Callable[[np.ndarray], np.ndarray]
Outputs = Callable[[np.ndarray], dict[str, np.ndarray]]


def _open(fmt: str, path: Path, providers: Sequence[str] | None,
          n_outputs: int) -> tuple[Outputs, str, dict[str, Any], list[str]]:
    """outputs function, provider, metadata and interface problems of an exported file."""
    if fmt == "torchscript":
        ts = load_torchscript(path)
        return ts.outputs, ts.provider, ts.meta.model_dump(), []
    model = OnnxModel.open(path, providers=providers)
    problems = []
    inp, out = model.session.get_inputs(), model.session.get_outputs()
    if len(inp) != 1 or inp[0].type != "tensor(uint8)":
        problems.append(f"input is {[i.type for i in inp]}, not one tensor(uint8)")
    elif isinstance(inp[0].shape[0], int):
        problems.append(f"batch axis is fixed at {inp[0].shape[0]}, not dynamic")
    if len(out) != n_outputs or any(o.type != "tensor(float)" for o in out):
        problems.append(f"outputs are {[o.type for o in out]}, not {n_outputs} tensor(float)")
    return model.outputs, model.provider, model.meta.model_dump(), problems


def _check_ood(outputs: Outputs, inputs: ParityInputs, reference: Reference,
               fp16: bool) -> tuple[dict[str, Any], list[str]]:
    """The exported ``ood_score`` against eager: same tolerance rule as the logits (fp16: the
    fp16 relative bound), on the parity batches."""
    assert reference.ood_batches is not None
    got = [outputs(x).get(OOD_OUTPUT) for x in inputs.batches]
    if any(g is None for g in got):
        return {"passed": False}, ["no ood_score output, though the bundle has a detector"]
    diff = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, reference.ood_batches, strict=True))
    scale = max(float(np.abs(r).max()) for r in reference.ood_batches)
    rel = diff / max(scale, _EPS)
    ok = rel <= FP16_REL_TOL if fp16 else (diff <= ABS_TOL or rel <= REL_TOL)
    report = {"max_abs_diff": diff, "max_rel_diff": rel, "max_abs_score": scale, "passed": ok}
    return report, [] if ok else [f"ood_score differs from eager (max abs {diff:.3g}, rel {rel:.3g})"]


def _run_all(run: Predict, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)])


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


def check_file(fmt: str, path: Path, card: Card, inputs: ParityInputs, reference: Reference,
               providers: Sequence[str] | None = None) -> dict[str, Any]:
    """Open one exported file (with all of its load-time checks) and measure it against eager."""
    scored = reference.ood_batches is not None
    outputs, provider, meta, problems = _open(fmt, Path(path), providers, 2 if scored else 1)

    def run(x: np.ndarray) -> np.ndarray:
        return outputs(x)[LOGITS]

    expected = card.export_meta(fmt).model_dump()
    problems += [f"metadata {k} differs from the card" for k in _META_KEYS if meta.get(k) != expected.get(k)]
    batches = {str(b): compare(run(x), ref)
               for b, x, ref in zip(inputs.batch_sizes, inputs.batches, reference.batches, strict=True)}
    split = None
    if inputs.split is not None and reference.split is not None:
        split = compare(_run_all(run, inputs.split), reference.split)
    sets = list(batches.values()) + ([split] if split is not None else [])
    overall = _overall(sets)
    fp16 = fmt == "onnx_fp16"
    for name, s in [*batches.items(), ("split", split)]:
        if s is not None and "shape" in s:
            problems.append(f"logits of shape {s['shape']} at {name}, expected {s['expected_shape']}")
    if not overall["finite"] and not any("shape" in s for s in sets):
        problems.append("non-finite logits")
    if overall["finite"]:
        if fp16:
            judged = split if split is not None else overall
            if judged["argmax_agreement"] < FP16_MIN_AGREEMENT:
                problems.append(f"argmax agreement {judged['argmax_agreement']:.2%} < {FP16_MIN_AGREEMENT:.1%}")
            if overall["max_rel_diff"] > FP16_REL_TOL:
                problems.append(f"max rel diff {overall['max_rel_diff']:.3g} > {FP16_REL_TOL:g}")
        else:
            if overall["max_abs_diff"] > ABS_TOL and overall["max_rel_diff"] > REL_TOL:
                problems.append(f"max abs diff {overall['max_abs_diff']:.3g} > {ABS_TOL:g} and max rel diff "
                                f"{overall['max_rel_diff']:.3g} > {REL_TOL:g}")
            if overall["disagreements"]:
                problems.append(f"{overall['disagreements']} argmax disagreement(s)")
    criterion: dict[str, Any] = (
        {"min_argmax_agreement": FP16_MIN_AGREEMENT, "rel_tol": FP16_REL_TOL,
         "agreement_on": "test split" if split is not None else "parity batches"}
        if fp16 else
        {"abs_tol": ABS_TOL, "rel_tol": REL_TOL, "min_argmax_agreement": 1.0,
         "rule": "max_abs_diff <= abs_tol or max_rel_diff <= rel_tol; near ties excepted from agreement"}
    )
    ood = None
    if scored:
        ood, ood_problems = _check_ood(outputs, inputs, reference, fp16)
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
        "criterion": criterion,
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


__all__ = ["ABS_TOL", "BATCH_SIZES", "FP16_MIN_AGREEMENT", "FP16_REL_TOL", "REL_TOL", "ParityError", "ParityInputs",
           "Reference", "check_file", "compare", "parity_inputs", "raise_on_failure"]
