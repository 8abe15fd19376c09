"""Drift: is what a task's model sees now still like its validation split?

The window lives in the inference worker (:class:`serving.models.ModelTable`): it is the one process
that sees every image of every API worker, so each task has one window however many API workers
there are (a window per API worker would split the traffic and test each part alone). For every
image the task's model scores, the window keeps the predicted class and the out-of-distribution
score, answered by the one rule (:func:`zoo.postprocess.interpret` with the card's calibration and
detector); it holds the last ``drift_window`` images (a :class:`collections.deque`).

Two tests compare the window with the card's :class:`~zoo.card.DriftReference` (the validation split
answered by the same rule, written by :func:`zoo.trust.fit.fit_bundle`):

* ``class_mix``: Pearson's chi-square goodness of fit of the window's predicted-class counts to the
  validation shares (:func:`scipy.stats.chisquare`). The chi-square approximation needs every
  expected count to be at least 5: the classes expected fewer times are pooled into one cell (with
  the least expected other class while that cell is still under 5); with fewer than two cells left
  there is no test.
* ``ood_score``: the two-sample Kolmogorov-Smirnov test of the window's OOD scores against the
  validation scores (:func:`scipy.stats.ks_2samp`).

Beside them, the window's OOD rate against the validation rate. A card without a reference (written
before there was one) gets the window's class mix and OOD rate, no test: ``status`` "no reference".
The tests run when asked (``GET /drift``) and, for the gauges, on a background thread at most once
a second for the windows that changed (:meth:`DriftMonitor.start`), never on the inference path.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from serving.schemas import DriftAnswer, DriftClass, DriftTest, TaskDrift
from zoo.card import DriftReference
from zoo.postprocess import Predictions

log = logging.getLogger("serving")

MIN_EXPECTED = 5.0  # the chi-square approximation's rule of thumb for every cell
REFRESH_S = 1.0  # how often the gauges follow the windows
CLASS_MIX, OOD_SCORE = "class_mix", "ood_score"  # the tests' names (the gauges' ``test`` label)


def pooled_cells(observed: np.ndarray, expected: np.ndarray,
                 minimum: float = MIN_EXPECTED) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Observed and expected counts with the classes expected fewer than ``minimum`` times pooled into
    one cell (grown by the least expected other class while it is still under ``minimum``); the pooled
    class indices. Fewer than two cells: the counts cannot be tested."""
    order = np.argsort(expected, kind="stable")
    pooled = [int(i) for i in order if expected[i] < minimum]
    rest = [int(i) for i in order if expected[i] >= minimum]
    while pooled and rest and expected[pooled].sum() < minimum:
        pooled.append(rest.pop(0))
    cells = [observed[rest], [observed[pooled].sum()]] if pooled else [observed[rest]]
    means = [expected[rest], [expected[pooled].sum()]] if pooled else [expected[rest]]
    return np.concatenate(cells).astype(float), np.concatenate(means).astype(float), sorted(pooled)


def class_mix_test(counts: np.ndarray, shares: Sequence[float], labels: Sequence[str]) -> DriftTest | None:
    """Chi-square goodness of fit of predicted-class ``counts`` to the reference ``shares`` (None when
    fewer than two cells remain once the rare classes are pooled)."""
    n = int(counts.sum())
    p = np.asarray(shares, dtype=float)
    expected = n * p / p.sum()
    obs, exp, pooled = pooled_cells(np.asarray(counts, dtype=float), expected)
    if len(obs) < 2:
        return None
    from scipy import stats  # here: the API workers import this module's names, not scipy

    # a class the reference never predicted but the window did lands in the pooled cell; its expectation
    # cannot be 0 there (the pooled cell is grown to MIN_EXPECTED), so the statistic stays finite
    result = stats.chisquare(obs, exp)
    return DriftTest(name="chi-square", statistic=float(result.statistic), p_value=float(result.pvalue),
                     dof=len(obs) - 1, pooled=[labels[i] for i in pooled])


def ood_score_test(scores: np.ndarray, reference: Sequence[float]) -> DriftTest | None:
    """Two-sample Kolmogorov-Smirnov test of the window's OOD ``scores`` against the validation's."""
    if len(scores) == 0 or len(reference) == 0:
        return None
    from scipy import stats

    result = stats.ks_2samp(scores, np.asarray(reference, dtype=float))
    return DriftTest(name="kolmogorov-smirnov", statistic=float(result.statistic), p_value=float(result.pvalue))


class DriftWindow:
    """The last ``size`` images one task's model scored: predicted class, OOD score and flag."""

    def __init__(self, task: str, model: str, labels: Sequence[str], size: int,
                 reference: DriftReference | None) -> None:
        self.task, self.model, self.labels, self.size, self.reference = task, model, list(labels), size, reference
        self.classes: deque[int] = deque(maxlen=size)
        self.scores: deque[float] = deque(maxlen=size)  # empty while the model has no detector
        self.flagged: deque[bool] = deque(maxlen=size)
        self.version = 0  # images added so far: the refresher tests a window only when it changed
        self._lock = threading.Lock()

    def add(self, answer: Predictions) -> None:
        """Append a batch's answers (the oldest images leave the window)."""
        with self._lock:
            self.classes.extend(int(c) for c in answer.classes)
            if answer.ood_score is not None and answer.in_distribution is not None:
                self.scores.extend(float(s) for s in answer.ood_score)
                self.flagged.extend(not bool(f) for f in answer.in_distribution)
            self.version += len(answer)

    def report(self) -> TaskDrift:
        """The window, its two tests and its OOD rate against the reference."""
        with self._lock:
            classes = np.fromiter(self.classes, dtype=np.int64, count=len(self.classes))
            scores = np.fromiter(self.scores, dtype=float, count=len(self.scores))
            flagged = np.fromiter(self.flagged, dtype=bool, count=len(self.flagged))
        counts = np.bincount(classes, minlength=len(self.labels))
        ref = self.reference
        shares = ref.class_proportions if ref is not None and len(ref.class_proportions) == len(self.labels) else None
        mix = [DriftClass(label=label, images=int(counts[i]), share=float(counts[i] / max(len(classes), 1)),
                          reference_share=None if shares is None else float(shares[i]))
               for i, label in enumerate(self.labels)]
        out = TaskDrift(task=self.task, model=self.model, status="ok", window_size=self.size, images=len(classes),
                        class_mix=mix, ood_rate=float(flagged.mean()) if len(flagged) else None)
        if ref is None or shares is None:
            out.status, out.message = "no reference", ("the model card has no drift reference (validation answers): "
                                                       "`zoo calibrate` the bundle to test drift")
            return out
        out.reference_images, out.reference_ood_rate = ref.images, ref.ood_rate
        if len(classes):
            out.class_test = class_mix_test(counts, shares, self.labels)
        if ref.ood_scores:
            out.ood_test = ood_score_test(scores, ref.ood_scores)
        return out


class DriftMonitor:
    """One window per served task (inside the inference worker) and the thread that exports their tests."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.windows: dict[str, DriftWindow] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, task: str, model: str, labels: Sequence[str], reference: DriftReference | None) -> None:
        """Keep a window for ``task`` (its model's id and labels, its card's reference)."""
        self.windows[task] = DriftWindow(task, model, labels, self.size, reference)

    def add(self, task: str, answer: Predictions) -> None:
        if task in self.windows:
            self.windows[task].add(answer)

    def report(self) -> DriftAnswer:
        """Every window's state and tests (``GET /drift``)."""
        return DriftAnswer(window_size=self.size, tasks={t: w.report() for t, w in self.windows.items()})

    def start(self, export: Callable[[TaskDrift], None], every_s: float = REFRESH_S) -> None:
        """Test the windows that changed every ``every_s`` seconds on a daemon thread and hand each
        report to ``export`` (the gauges); an export that fails is logged, the thread goes on."""
        seen: dict[str, int] = {}

        def loop() -> None:
            import scipy.stats  # noqa: F401  (imported here, in the background: seconds on a busy CPU)

            while not self._stop.wait(every_s):
                for task, window in list(self.windows.items()):
                    if window.version == seen.get(task, 0):
                        continue
                    seen[task] = window.version
                    try:
                        export(window.report())
                    except Exception:  # a bug in one export must not stop the others; logged with its traceback
                        log.exception("drift: exporting %s failed", task)

        self._thread = threading.Thread(target=loop, name="drift-gauges", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["CLASS_MIX", "MIN_EXPECTED", "OOD_SCORE", "REFRESH_S", "DriftMonitor", "DriftWindow", "class_mix_test",
           "ood_score_test", "pooled_cells"]
