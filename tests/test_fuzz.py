"""Fuzzing the decoders with mutations of real files: nothing but ImageError leaves zoo.preprocess.

A client's file may be damaged or hostile; whatever Pillow, pydicom or their plugins raise on it
must become a refusal with a reason (415 / 422 / 413 over HTTP), never a server error. The corpus
(tests/fuzzing.py) is seeded, so a failure names a file that can be made again.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from fuzzing import FORMATS, corpus, seed_files

from zoo.errors import ImageError
from zoo.preprocess import Preprocessing, load_image, probe

MUTATIONS_PER_FORMAT = 2000
PREP = {1: Preprocessing(28, 28, 1, (0.5,), (0.5,)), 3: Preprocessing(28, 28, 3, (0.5,) * 3, (0.5,) * 3)}


def test_every_seed_file_decodes() -> None:
    """The unmutated real files are read: the corpus starts from images that work."""
    for fmt, files in seed_files().items():
        for i, data in enumerate(files):
            assert load_image(data, PREP[3]).shape == (3, 28, 28), (fmt, i)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_files_raise_only_image_error(fmt: str) -> None:
    """2,000 mutations per format: probe and load_image either answer or raise ImageError with a
    known kind, and no file takes long (every header-derived cost is bounded)."""
    kinds: dict[str, int] = {}
    slowest = (0.0, "")
    for name, data in corpus(fmt, MUTATIONS_PER_FORMAT, seed=1):
        start = time.perf_counter()
        for step in (lambda d: probe(d), lambda d: load_image(d, PREP[1 + 2 * (len(d) % 2)])):
            try:
                out = step(data)
            except ImageError as e:
                assert e.kind in ("empty", "unsupported", "too_large", "corrupt"), (name, e.kind, str(e))
                kinds[e.kind] = kinds.get(e.kind, 0) + 1
                break
            except Exception as e:  # noqa: BLE001 - the test's point: name the file and the escaping type
                pytest.fail(f"{name}: {type(e).__name__} escaped: {e}")
            if isinstance(out, np.ndarray):
                assert out.dtype == np.uint8 and out.shape[1:] == (28, 28), name
                kinds["decoded"] = kinds.get("decoded", 0) + 1
        slowest = max(slowest, (time.perf_counter() - start, name))
    assert kinds.get("decoded", 0) > 0 and sum(v for k, v in kinds.items() if k != "decoded") > 0, kinds
    assert slowest[0] < 5, f"{slowest[1]} took {slowest[0]:.1f} s"
