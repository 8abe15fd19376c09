"""DICOM Structured Reports as the answer of ``POST /<task>`` and ``POST /pathology_ensemble``, asked for with
``?output=dicom-sr`` (or the form field ``output``) or ``Accept: application/dicom``.

The request runs the usual pipeline (:meth:`serving.frontend.Frontend.run`) with the route's ``keep_dicom``:
the header step keeps each DICOM header (no pixel data) and refuses any other image with 406
(:func:`serving.decoding.keep_dicom_header`). Each answered image's JSON result becomes its SR
(:func:`zoo.dicom_sr.build_sr`), and the body is:

* one image: the SR, ``application/dicom``;
* several: ``multipart/related; type="application/dicom"``, one part per image in upload order (DICOMweb's
  multipart form, PS3.18 8.7.1);
* some refused: 206 with the SRs of the others and a ``Warning`` header per refused image (as a DICOMweb
  retrieve answers a partial result);
* none answered: the JSON error answer with the images' status (406 when none is DICOM).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from serving.frontend import Answered, Frontend, Route
from serving.schemas import EnsembleImageResult, ImageResult
from serving.uploads import Upload

OUTPUT_SR = "dicom-sr"
WARNING_TEXT = 200  # characters of a refusal in a Warning header


def wants_sr(output: str | None) -> bool:
    """Whether the request asked for DICOM SRs (``output`` as :func:`serving.uploads.parse_output` read it)."""
    return output == OUTPUT_SR


def _dataset(route: Route) -> str:
    """The dataset whose class codes the SRs use (a task's model, or the ensemble's first member)."""
    info: Any = getattr(route, "info", None)
    members = getattr(info, "members", None) or [info]
    return getattr(members[0], "dataset", None) or route.name


def _answers(route: Route, results: list[ImageResult]) -> list[Any]:
    """The :class:`zoo.dicom_sr.SRAnswer` of each answered result."""
    from zoo.dicom_sr import ModelIdentity, SRAnswer

    labels: list[str] = getattr(route, "labels", None) or []  # TaskRoute and EnsembleRoute set it
    models = [ModelIdentity(id=m.id, weights_sha256=m.weights_sha256) for m in route.served()]
    out = []
    for r in results:
        assert r.top, "an answered image has its top classes"
        best = r.top[0]
        out.append(SRAnswer(
            dataset=_dataset(route), labels=labels, predicted=best.class_, probability=best.prob,
            prediction_set=r.prediction_set, alpha=r.alpha, ood_score=r.ood_score, in_distribution=r.in_distribution,
            agreement=r.agreement if isinstance(r, EnsembleImageResult) else None, models=models))
    return out


def _encode(sources: list[Any], answers: list[Any]) -> list[tuple[str, bytes]]:
    """(SOP instance UID, Part 10 bytes) of each SR (one series per study of the request)."""
    from zoo.dicom_sr import build_all, sr_bytes

    return [(str(sr.SOPInstanceUID), sr_bytes(sr)) for sr in build_all(list(zip(sources, answers)))]


def multipart_related(parts: list[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body and its content type. Written out: the
    standard library's ``email`` generator re-encodes binary payloads and urllib3's encoder writes
    form-data parts; a DICOMweb body is boundaries and one Content-Type per part."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in p for p in parts):  # never inside a part (practically never happens)
        boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for p in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), p, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _warnings(refused: list[ImageResult]) -> str:
    """One ``Warning`` value (code 299, RFC 9111 5.5) per refused image, as ASCII."""
    items = []
    for r in refused:
        text = f"image {r.index} ({r.filename}): {r.status} {(r.error or '')[:WARNING_TEXT]}"
        items.append('299 medzoo "' + ascii(text)[1:-1].replace('"', "'") + '"')
    return ", ".join(items)


def dicom_response(srs: list[tuple[str, bytes]], refused: list[ImageResult]) -> Response:
    """The SRs as the body (module docstring): 200, or 206 with a ``Warning`` when images were refused."""
    headers = {"warning": _warnings(refused)} if refused else {}
    status = 206 if refused else 200
    if len(srs) == 1:
        uid, data = srs[0]
        headers["content-disposition"] = f'attachment; filename="{uid}.sr.dcm"'
        return Response(data, status_code=status, headers=headers, media_type="application/dicom")
    body, ctype = multipart_related([data for _, data in srs])
    return Response(body, status_code=status, headers={**headers, "content-type": ctype})


async def sr_answer(fe: Frontend, build: Awaitable[Route], uploads: list[Upload]) -> tuple[int, BaseModel] | Response:
    """The request's SRs, or its JSON answer when no image could be answered (a
    :class:`~serving.uploads.Problem` goes to the caller, as for JSON answers)."""
    try:
        route = await build
        route.keep_dicom = True
        status, answer = await fe.run(route, uploads)
    except Answered as a:
        return a.status, a.body
    if status != 200:
        return status, answer
    results: list[ImageResult] = getattr(answer, "results", None) or []  # TaskAnswer, EnsembleAnswer
    answered = [r for r in results if r.status == 200]
    sources = {up.index: up.dicom for up in uploads}
    # ~50 ms an SR on a shared 2-core CPU: built in a thread, not on the event loop that answers other requests
    srs = await asyncio.to_thread(_encode, [sources[r.index] for r in answered], _answers(route, answered))
    return dicom_response(srs, [r for r in results if r.status != 200])


__all__ = ["OUTPUT_SR", "dicom_response", "multipart_related", "sr_answer", "wants_sr"]
