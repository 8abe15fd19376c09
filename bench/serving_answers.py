"""Every status code and JSON body a running service gives for a fixed set of requests: run it before and
after a change of the serving code and compare the two files (``--compare``), to show that the answers
did not change.

Requests: 20 real BreastMNIST test images (one multipart request, and each alone) and the hostile files
of the test suite (tests/test_serving.py's BAD_FILES, 20 seeded mutations per format from
tests/fuzzing.py, GIF / WebP / TGA), each alone and all in one request beside a good image, through
``/skin``, ``/pathology_ensemble`` and ``/skin/explain``. Timings and request ids are left out.

    python bench/serving_answers.py --url http://127.0.0.1:3000 --breast-root ../shared/data/medmnist --out before.json
    python bench/serving_answers.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"request_id", "took_ms", "elapsed_ms", "time"}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def inputs(breast_root: Path) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(20 real test images, the hostile files)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fuzzing import FORMATS, corpus
    from test_serving import BAD_FILES, encode, noise_image

    test = np.load(breast_root / "breastmnist.npz")["test_images"][:20]
    good = [(f"breast-{i}.png", _png(a)) for i, a in enumerate(test)]
    bad = [(f"{name}.bin", make()) for name, (make, _) in BAD_FILES.items()]
    bad += [(name, data) for fmt in FORMATS for name, data in corpus(fmt, 20, seed=11)]
    bad += [("other.gif", encode(noise_image("P"), "GIF")), ("other.webp", encode(noise_image(), "WEBP")),
            ("other.tga", encode(noise_image(), "TGA"))]
    return good, bad


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _post(client: httpx.Client, route: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    r = client.post(route, files=[("images", (n, d, "application/octet-stream")) for n, d in files])
    try:
        body = _clean(r.json())
    except ValueError:
        body = r.text
    return {"status": r.status_code, "body": body}


def record(url: str, breast_root: Path) -> dict[str, Any]:
    good, bad = inputs(breast_root)
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=300) as c:
        for route in ("/skin", "/pathology_ensemble", "/skin/explain"):
            out[f"{route} all good"] = _post(c, route, good)
            out[f"{route} all hostile + one good"] = _post(c, route, [good[0], *bad[:60]])
            for name, data in (good if route != "/skin/explain" else good[:3]):
                out[f"{route} {name}"] = _post(c, route, [(name, data)])
            for name, data in bad:
                out[f"{route} {name}"] = _post(c, route, [(name, data)])
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    diffs = [f"missing after: {k}" for k in before if k not in after]
    diffs += [f"new after: {k}" for k in after if k not in before]
    diffs += [f"{k}: {json.dumps(before[k])[:300]} != {json.dumps(after[k])[:300]}"
              for k in before if k in after and before[k] != after[k]]
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--breast-root", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(before, after)
        print("\n".join(diffs) or f"identical: {len(before)} requests, every status and body")
        return 1 if diffs else 0
    answers = record(args.url, args.breast_root)
    args.out.write_text(json.dumps(answers, indent=1, sort_keys=True))
    print(f"{len(answers)} answers written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
