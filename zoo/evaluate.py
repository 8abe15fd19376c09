"""``zoo eval``: metrics of a bundle on one split of the data it was trained on.

Probabilities are the calibrated ones (as served and scored); with a calibration, ECE / Brier / NLL
before and after are shown, with a detector the fraction of the split flagged out of distribution,
and with conformal scores the prediction sets' coverage and mean size (at the card's α or ``alpha``).
``--corruptions`` (:func:`robustness_bundle`) measures the same under MedMNIST-C's acquisition
artefacts (:mod:`zoo.trust.robustness`) and writes the result into the card.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.bundle import Bundle, load_bundle
from zoo.card import Card, RobustnessInfo, RobustnessRow, update_card
from zoo.errors import UsageError
from zoo.inference import bundle_splits, pick_device, predict_logits
from zoo.metrics import compute_metrics
from zoo.modelcard import write_model_card
from zoo.postprocess import check_alpha, interpret, to_probs
from zoo.trust import robustness as rb
from zoo.trust.calibration import calibration_metrics
from zoo.trust.conformal import set_metrics

SPLITS = ("train", "val", "test")


def evaluate_bundle(
    path: str | Path, split: str = "test", data_root: str | Path | None = None,
    device: str | None = None, download: bool = True, alpha: float | None = None,
) -> dict[str, Any]:
    """Metrics plus per-image predictions (``pred``, ``probs``, ``sets``) for one split."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    alpha = check_alpha(alpha)
    dev = pick_device(device)
    bundle = load_bundle(path, dev)
    ds = getattr(bundle_splits(bundle.card, data_root, download), split)
    labels = ds.labels.numpy()
    logits, ood = _outputs(bundle, ds.images, dev)
    answer = interpret(logits, bundle.card, ood, alpha)  # calibrated probabilities and sets, as served and scored
    metrics = compute_metrics(labels, answer.probs, bundle.labels)
    cal = bundle.card.calibration
    if cal is not None:
        metrics["calibration"] = {"kind": cal.kind, "temperature": cal.temperature,
                                  "before": calibration_metrics(to_probs(logits), labels),
                                  "after": calibration_metrics(answer.probs, labels)}
    if answer.in_distribution is not None:
        metrics["ood_flagged"] = float((~answer.in_distribution).mean())
    if answer.sets is not None:
        metrics["prediction_sets"] = {"alpha": answer.alpha, **set_metrics(answer.sets, labels.astype(np.int64))}
    return {"bundle": bundle.id, "split": split, "metrics": metrics, "pred": answer.classes, "probs": answer.probs,
            "labels": labels, "calibrated": answer.calibrated, "ood_score": answer.ood_score, "sets": answer.sets}


def _threshold(card: Card) -> tuple[float | None, str]:
    """The binary decision threshold of MedMNIST-C's balanced error, and where it comes from."""
    if card.num_classes != 2:
        return None, "multi-class: the most probable class (no threshold)"
    cal = card.calibration
    if cal is not None and cal.threshold is not None:
        return cal.threshold, "the card's calibration threshold (Youden's J on validation) on P(class 1)"
    return 0.5, "0.5 on P(class 1) (the card has no calibration threshold)"


def robustness_bundle(
    path: str | Path, severities: str | Sequence[int] | None = None, alpha: float | None = None,
    images: int | None = None, data_root: str | Path | None = None, device: str | None = None,
    download: bool = True, write: bool = True,
) -> RobustnessInfo:
    """MedMNIST-C's corruptions of the bundle's dataset (or the generic set) on its test split (a
    seeded sample of ``images`` of it when given) at ``severities`` (``"1-5"``, ``[1, 3]``; default
    all five): per corruption × severity ACC, AUC, balanced error, share flagged out of distribution,
    prediction-set coverage and size; per corruption BE / rBE against MedMNIST-C's AlexNet. Written
    into the card and README.md (``write``)."""
    alpha, severities = check_alpha(alpha), rb.parse_severities(severities)
    dev = pick_device(device)
    bundle = load_bundle(path, dev)
    card = bundle.card
    test = bundle_splits(card, data_root, download).test
    x, y = test.images.numpy(), test.labels.numpy().astype(np.int64)
    if images is not None:
        if images < 2:
            raise UsageError(f"--images must be at least 2, not {images}")
        keep = np.sort(np.random.default_rng(rb.SEED).permutation(len(y))[:images])
        x, y = x[keep], y[keep]
    corruptions, source = rb.corruption_set(card.dataset.name)
    threshold, threshold_source = _threshold(card)

    def measure(imgs: np.ndarray) -> tuple[dict[str, Any], float | None]:
        logits, ood = _outputs(bundle, torch.from_numpy(imgs), dev)
        answer = interpret(logits, card, ood, alpha)
        return rb.condition_metrics(y, answer, bundle.labels, threshold), answer.alpha

    clean, used_alpha = measure(rb.corrupt(x, None, None, rb.SEED))  # through the same resizes as the corrupted
    rows = [RobustnessRow(corruption=name, severity=sev, **measure(rb.corrupted(x, name, c, sev))[0])
            for name, c in corruptions.items() for sev in severities]
    size = card.dataset.image_size
    resolution = (f"at {rb.WORK_SIZE} px, the images' own size" if size == rb.WORK_SIZE else
                  f"at {rb.WORK_SIZE} px (MedMNIST-C's), the {size} px images resized up (bilinear) and back")
    info = rb.summarise(card.dataset.name, clean, rows, source=source, resolution=resolution, alpha=used_alpha,
                        threshold=threshold, threshold_source=threshold_source, seed=rb.SEED, images=len(y))
    if write:
        update_card(path, robustness=info)
        write_model_card(path)
    return info


def _outputs(bundle: Bundle, images: torch.Tensor, dev: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits, and the out-of-distribution scores when the bundle has a detector."""
    if bundle.scored is None:
        return predict_logits(bundle.model, images, device=dev).numpy(), None
    logits, ood = [], []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            lg, sc = bundle.scored(images[i : i + 128].to(dev))
            logits.append(lg.float().cpu())
            ood.append(sc.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(ood).numpy()


def format_metrics(m: dict[str, Any]) -> str:
    recall = ", ".join(f"{k[:20]} {v:.3f}" for k, v in m["per_class_recall"].items())
    text = (
        f"n={m['n']}  ACC {m['acc']:.4f}  macro-F1 {m['macro_f1']:.4f}  AUC {m['auc']:.4f}\n"
        f"per-class recall: {recall}\nconfusion:\n"
        + "\n".join("  " + " ".join(f"{v:5d}" for v in row) for row in m["confusion"])
    )
    cal = m.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        kind = cal.get("kind", "temperature")
        how = f"temperature {cal['temperature']:.3f}" if kind == "temperature" else kind
        text += (f"\ncalibration ({how}): ECE {b['ece']:.4f} -> {a['ece']:.4f}, "
                 f"Brier {b['brier']:.4f} -> {a['brier']:.4f}, NLL {b['nll']:.4f} -> {a['nll']:.4f}")
    if "ood_flagged" in m:
        text += f"\nflagged out of distribution: {m['ood_flagged']:.1%}"
    sets = m.get("prediction_sets")
    if sets:
        text += (f"\nprediction sets at alpha {sets['alpha']:g}: coverage {sets['coverage']:.1%}, "
                 f"mean size {sets['mean_set_size']:.2f}")
    return text


def _cell(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def format_robustness(info: RobustnessInfo) -> str:
    """The corruption × severity table, then BE / rBE per corruption, as text."""
    lines = [f"{info.source}; {info.resolution}; {info.images} test images, seed {info.seed}",
             f"balanced error threshold: {info.threshold_source}",
             f"{'corruption':18s} sev    ACC    AUC  bal.err  OOD   cover  set"]
    clean = info.clean
    for name, sev, r in [("clean", "-", clean)] + [(r.corruption, str(r.severity), r.model_dump()) for r in info.rows]:
        lines.append(f"{name:18s} {sev:>3s} {_cell(r['acc'], '6.3f')} {_cell(r['auc'], '6.3f')} "
                     f"{_cell(r['balanced_error'], '8.3f')} {_cell(r['ood_flagged'], '5.2f')} "
                     f"{_cell(r['coverage'], '6.3f')} {_cell(r['mean_set_size'], '4.2f')}")
    if info.be:
        lines.append(f"BE / rBE against {info.baseline}:")
        lines += [f"  {name:18s} BE {info.be[name]:.3f}  rBE {info.rbe[name]:.3f}" for name in info.be]
        lines.append(f"  {'mean':18s} BE {info.summary['be']:.3f}  rBE {info.summary['rbe']:.3f}")
    else:
        lines.append(f"BE / rBE: {info.baseline}")
    return "\n".join(lines)


__all__ = ["SPLITS", "evaluate_bundle", "format_metrics", "format_robustness", "robustness_bundle"]
