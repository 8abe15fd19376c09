"""The out-of-distribution detector, a torch module that exports with the network.

Method: multi-layer Mahalanobis distance in the spirit of Lee, Lee, Lee and Shin, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks" (NeurIPS
2018). At up to :data:`MAX_LAYERS` layers of the network — convolutions spread from first to last
(their output averaged over space) and the hidden fully-connected layers — one Gaussian is fitted
to the training images' activations (Ledoit-Wolf shrunk covariance, scikit-learn, because a few
hundred images do not determine a 256-dimensional covariance); an image's distance to it is
standardised with the validation images' mean and spread, and the layers' standardised distances
are averaged. The threshold is the validation split's 95th percentile, so about 95 % of
in-distribution images pass.

Why not a logit-based score (maximum softmax probability, energy, max-logit): on BreastMNIST they
rank natural photographs as *more* in-distribution than the test images (AUROC 0.28–0.33, measured
for the small CNN of the tests), while the multi-layer distance separates them (AUROC ≥ 0.98;
docs/BENCHMARKS.md, bench/bench_trust.py). Early layers carry the texture and intensity
statistics that tell an ultrasound from a photograph; the last layers alone do not.

The score is computed inside the exported model (``ood_score`` output beside ``logits``), so a
lone ONNX file flags images without torch and without the statistics file.

Numerics: the graph runs in float32, so it never holds an inverse covariance. The statistics are
kept in float64 (``ood.safetensors``, the same keys since the detector exists) and folded, in
float64, into one centring and one whitening matrix per layer, W with W Wᵀ = precision; the score
is then a sum of squares of (f − centre) W, whose float32 error grows with cond(W) = √cond(cov),
and the fit floors the covariance's eigenvalues at :data:`EIGEN_FLOOR` of the largest. On the organ
default model (issue 18) ONNX and eager scores now differ by 1e-4 (3e-5 of the score scale), against
8e-3 for the quadratic form dᵀ P d.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MAX_LAYERS = 8
MAX_CONV_LAYERS = 6
MAX_DIM = 512  # wider features are projected on their first PCA_DIM principal components
PCA_DIM = 256
MAX_FIT_IMAGES = 10_000  # training images used for the statistics (a random subset above this)
TARGET_TPR = 0.95
EIGEN_FLOOR = 1e-6  # covariance eigenvalues kept ≥ this × the largest (fit_layer says why)
INPUT = ":in"  # suffix of a layer name whose input (not output) is tapped
METHOD = ("multi-layer Mahalanobis distance (Lee et al., NeurIPS 2018): pooled activations of {n} layers, "
          "Ledoit-Wolf covariance on the train split (eigenvalues floored at 1e-6 of the largest), standardised "
          "and averaged; threshold at the validation split's 95th percentile")


def feature_layers(net: nn.Module) -> list[str]:
    """The layers the detector reads: convolutions spread over the depth, then hidden linear layers."""
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if len(convs) > MAX_CONV_LAYERS:
        idx = np.linspace(0, len(convs) - 1, MAX_CONV_LAYERS).round().astype(int)
        convs = [convs[i] for i in sorted(set(idx.tolist()))]
    hidden = linears[:-1][-(MAX_LAYERS - len(convs)):] if MAX_LAYERS > len(convs) else []
    layers = convs + hidden
    if not layers:  # a single linear layer (an MLP without hidden layers): its input, the image
        layers = [f"{linears[-1]}{INPUT}"]
    return layers


class FeatureTap:
    """Forward hooks collecting the pooled activation of each named layer during a forward pass
    (a name ending in ``:in`` taps the layer's input instead of its output)."""

    def __init__(self, net: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(net.named_modules())
        self.layers = list(layers)
        self.values: list[torch.Tensor] = []
        self._handles = []
        for name in self.layers:
            module = modules[name.removesuffix(INPUT)]
            if name.endswith(INPUT):
                self._handles.append(module.register_forward_pre_hook(lambda m, args: self._keep(args[0])))
            else:
                self._handles.append(module.register_forward_hook(lambda m, args, out: self._keep(out)))

    def _keep(self, x: torch.Tensor) -> None:
        x = x.float()
        self.values.append(x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1))

    def take(self, n: int | None = None) -> list[torch.Tensor]:
        """The values collected since the last call. With ``n`` (the images of the batch), the rows of
        test-time augmentation views (the network saw ``views × n`` images) are averaged per image."""
        values, self.values = self.values, []
        if n is None:
            return values
        return [v if v.shape[0] == n else v.unflatten(0, (-1, n)).mean(0) for v in values]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class LayerStats:
    """One layer's Gaussian (in its possibly PCA-reduced space) and the validation normalisation.

    Stored as written since the detector exists (``ood.safetensors``: mean, precision, projection,
    norm), so every bundle loads; the whitening the scores are computed with is derived from the
    precision (:meth:`whitening`)."""

    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C)
    proj_mean: np.ndarray | None  # (D,) when projected
    proj: np.ndarray | None  # (D, C) when projected: orthonormal columns (PCA components)
    loc: float = 0.0  # validation mean of the distance
    scale: float = 1.0  # validation standard deviation of the distance

    def whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """``(centre (D,), W (D, C))`` in float64 with distance(f) = ‖(f − centre) W‖².

        Why: the quadratic form dᵀ P d in float32 loses digits in proportion to cond(P) (its terms
        are large and cancel); the sum of squares of W d loses them in proportion to
        √cond(P) = cond(W), and the fitted floor (:data:`EIGEN_FLOOR`) bounds that. W = V √Λ from
        P = V Λ Vᵀ (``eigh``, float64); round-off negatives of a semi-definite P are clipped to 0.
        The PCA projection is folded in: its columns are orthonormal, so
        (f − m) Q − μ = (f − m − Q μ) Q and one centring and one matrix remain."""
        precision = (self.precision + self.precision.T) / 2
        vals, vecs = np.linalg.eigh(precision)
        w = vecs * np.sqrt(np.clip(vals, 0.0, None))
        if self.proj is None:
            return self.mean, w
        return self.proj_mean + self.proj @ self.mean, self.proj @ w

    def distance(self, f: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of features (N, D), in float64."""
        centre, w = self.whitening()
        z = (f.astype(np.float64) - centre) @ w
        return np.einsum("ij,ij->i", z, z)


def fit_layer(train_features: np.ndarray) -> LayerStats:
    """A Gaussian with Ledoit-Wolf covariance (after PCA when the features are wide), its
    eigenvalues floored at :data:`EIGEN_FLOOR` × the largest."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    f = train_features.astype(np.float64)
    proj_mean = proj = None
    if f.shape[1] > MAX_DIM:
        pca = PCA(n_components=min(PCA_DIM, len(f) - 1, f.shape[1])).fit(f)
        proj_mean, proj = pca.mean_, pca.components_.T
        f = (f - proj_mean) @ proj
    lw = LedoitWolf().fit(f)
    vals, vecs = np.linalg.eigh(lw.covariance_)
    # A constant feature (a channel that never fires on these images) or fewer images than
    # dimensions makes the sample covariance singular; Ledoit-Wolf's shrinkage lifts its zero
    # eigenvalues only by shrinkage × mean variance, which is near 0 when images are many. The floor
    # bounds cond(covariance) by 1 / EIGEN_FLOOR, so float32 inference stays within the parity
    # tolerance, and caps what a direction the training images never varied in can add.
    vals = np.maximum(vals, EIGEN_FLOOR * max(float(vals.max()), np.finfo(np.float64).tiny))
    precision = (vecs / vals) @ vecs.T
    return LayerStats(lw.location_, precision, proj_mean, proj)


class OODScorer(nn.Module):
    """Standardised Mahalanobis distances of the tapped activations, averaged over the layers.

    Each layer is one centring and one float32 matrix, folded in float64 at construction from
    the stored statistics: z = (f − centre) W / √(scale · layers), so that the score is
    Σ ‖z‖² − Σ loc / (scale · layers), a sum of squares (no inverse covariance in the graph)."""

    def __init__(self, stats: Sequence[LayerStats]) -> None:
        super().__init__()
        self.n = len(stats)
        offset = 0.0
        for i, s in enumerate(stats):
            centre, w = s.whitening()
            self.register_buffer(f"centre{i}", torch.tensor(centre, dtype=torch.float32))
            self.register_buffer(f"whiten{i}", torch.tensor(w / np.sqrt(s.scale * self.n), dtype=torch.float32))
            offset += s.loc / (s.scale * self.n)
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        total = -self.offset
        for i, f in enumerate(features):
            z = (f - getattr(self, f"centre{i}")) @ getattr(self, f"whiten{i}")
            total = total + (z * z).sum(dim=1)
        return total


class ScoredModel(nn.Module):
    """The served model (``Sequential(InputAdapter, net or FlipTTA(net))``) returning
    ``(logits, ood_score)``: what is exported. The layers are ``net``'s; with test-time
    augmentation the features of the views are averaged per image."""

    def __init__(self, model: nn.Sequential, net: nn.Module, layers: Sequence[str], scorer: OODScorer) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer
        self.tap = FeatureTap(net, layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tap.take()
        logits = self.model(x)
        return logits, self.scorer(self.tap.take(x.shape[0]))


def stats_to_tensors(stats: Sequence[LayerStats]) -> dict[str, torch.Tensor]:
    """The statistics as named tensors (written to ``ood.safetensors``)."""
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(stats):
        out[f"{i}.mean"] = torch.tensor(s.mean)
        out[f"{i}.precision"] = torch.tensor(s.precision)
        out[f"{i}.norm"] = torch.tensor([s.loc, s.scale], dtype=torch.float64)
        if s.proj is not None:
            out[f"{i}.proj_mean"] = torch.tensor(s.proj_mean)
            out[f"{i}.proj"] = torch.tensor(s.proj)
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor], n: int) -> list[LayerStats]:
    def arr(key: str) -> np.ndarray | None:
        t = tensors.get(key)
        return None if t is None else t.double().numpy()

    out = []
    for i in range(n):
        norm = tensors[f"{i}.norm"].double().tolist()
        out.append(LayerStats(arr(f"{i}.mean"), arr(f"{i}.precision"), arr(f"{i}.proj_mean"), arr(f"{i}.proj"),
                              norm[0], norm[1]))
    return out


@torch.no_grad()
def collect(model: nn.Sequential, net: nn.Module, layers: Sequence[str], images: torch.Tensor, batch_size: int = 128,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (N, K') of the served model and the tapped features of ``net``'s layers for uint8
    images, in eval mode (test-time augmentation views averaged, as :class:`ScoredModel` does)."""
    model.eval()
    tap = FeatureTap(net, layers)
    logits, feats = [], [[] for _ in layers]
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size].to(device)
            logits.append(model(batch).float().cpu())
            for store, value in zip(feats, tap.take(len(batch)), strict=True):
                store.append(value.cpu())
    finally:
        tap.remove()
    return torch.cat(logits).numpy(), [torch.cat(f).double().numpy() for f in feats]


def fit_detector(train_feats: Sequence[np.ndarray], val_feats: Sequence[np.ndarray]) -> tuple[list[LayerStats], float]:
    """Per-layer Gaussians on the train split, standardised on validation; the threshold passing
    :data:`TARGET_TPR` of the validation images."""
    stats = []
    for tr, va in zip(train_feats, val_feats, strict=True):
        s = fit_layer(tr)
        d = s.distance(va)
        s.loc, s.scale = float(d.mean()), float(max(d.std(), 1e-6))
        stats.append(s)
    threshold = float(np.quantile(score(stats, val_feats), TARGET_TPR))
    return stats, threshold


def score(stats: Sequence[LayerStats], feats: Sequence[np.ndarray]) -> np.ndarray:
    """The detector's score in numpy (what :class:`OODScorer` computes in the exported graph)."""
    total = np.zeros(len(feats[0]))
    for s, f in zip(stats, feats, strict=True):
        total += (s.distance(f) - s.loc) / s.scale
    return total / len(stats)


__all__ = ["EIGEN_FLOOR", "INPUT", "MAX_FIT_IMAGES", "METHOD", "TARGET_TPR", "FeatureTap", "LayerStats", "OODScorer",
           "ScoredModel", "collect", "feature_layers", "fit_detector", "fit_layer", "score", "stats_from_tensors",
           "stats_to_tensors"]
