"""The upload guard (:mod:`serving.uploads`) without a server: every request-level rule.

:class:`~serving.uploads.UploadGuard` wraps a stand-in endpoint (``endpoint`` below) that answers, as
JSON, the method and path it saw, the body it could still read, and what the guard parsed for it
(``scope["state"][STATE_KEY]``). Requests are made by ``httpx.AsyncClient`` over
``httpx.ASGITransport``: real multipart bodies, raw bodies, odd headers. What no client sends (a
stalled or vanished upload, header bytes httpx refuses) goes straight to the ASGI callable or to
:func:`~serving.uploads.body_stream` / :func:`~serving.uploads.read_request`.

The guard does not decode images: any bytes are an upload here, and what the decoder says of them
is tested elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from serving.config import Limits
from serving.uploads import (
    STATE_KEY,
    Problem,
    Upload,
    UploadGuard,
    as_uploads,
    body_stream,
    megabytes,
    parse_target,
    parse_top_k,
    read_request,
)

pytestmark = pytest.mark.anyio

LIMITS = Limits(max_file_bytes=1000, max_request_bytes=100_000, max_images=3, body_timeout_s=0.2)
UPLOAD_ROUTES = ["/skin", "/pathology_ensemble", "/skin/explain"]
GET_ROUTES = ["/models", "/stats"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # not decoded here: any bytes are an upload
BIG = b"\x89PNG\r\n\x1a\n" + bytes(LIMITS.max_file_bytes - 7)  # one byte over the per-file limit
FILE_LIMIT = f"larger than the {megabytes(LIMITS.max_file_bytes)} limit"
REQUEST_LIMIT = f"request larger than the {megabytes(LIMITS.max_request_bytes)} limit"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def endpoint(scope: Scope, receive: Receive, send: Callable[[Message], Awaitable[None]]) -> None:
    """The stand-in endpoint: answers what reached it."""
    body = b""
    with anyio.fail_after(2):  # a guard that left the body half-read would hang here
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
    parsed = scope.get("state", {}).get(STATE_KEY)
    seen: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "body_sha256": sha(body),
                            "body_len": len(body), "parsed": None}
    if parsed is not None:
        seen["parsed"] = {
            "uploads": [{"index": u.index, "filename": u.filename, "size": None if u.data is None else len(u.data),
                         "sha256": None if u.data is None else sha(u.data), "status": u.status, "error": u.error}
                        for u in parsed.uploads],
            "top_k": parsed.top_k, "target": parsed.target}
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-endpoint", b"reached")]})
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


def guard(limits: Limits = LIMITS) -> UploadGuard:
    return UploadGuard(endpoint, upload_routes=UPLOAD_ROUTES, get_routes=GET_ROUTES, limits=limits)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard()), base_url="http://medzoo.test") as c:
        yield c


def files(*items: tuple[str, bytes], field: str = "images") -> list[tuple[str, Any]]:
    return [(field, (name, data, "image/png")) for name, data in items]


def reached(r: httpx.Response) -> dict[str, Any]:
    """What the endpoint saw (the guard let the request through)."""
    assert r.status_code == 200 and r.headers.get("x-endpoint") == "reached", (r.status_code, r.text)
    return r.json()


def refused(r: httpx.Response, status: int, phrase: str) -> str:
    """The guard answered ``status`` itself, with ``phrase`` in its JSON error; the endpoint saw nothing."""
    assert r.status_code == status, (r.status_code, r.text)
    assert "x-endpoint" not in r.headers, r.text
    assert r.headers["connection"] == "close"  # the body may be unread
    error = r.json()["error"]
    assert phrase in error, error
    return error


def multipart(*parts: bytes, boundary: bytes = b"b") -> tuple[bytes, dict[str, str]]:
    """A hand-made multipart body (for what httpx will not write), and its content type."""
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def file_part(disposition: bytes, data: bytes = PNG) -> bytes:
    return b"Content-Disposition: form-data; " + disposition + b"\r\nContent-Type: image/png\r\n\r\n" + data


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> Scope:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query, "headers": headers,
            "client": ("127.0.0.1", 40000), "server": ("medzoo.test", 80)}


async def call(app: Any, scope: Scope, receive: Receive) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request straight into an ASGI callable: status, headers, body."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def stalling(*chunks: bytes) -> tuple[Receive, list[float]]:
    """A client that sends ``chunks`` (more to come) and then nothing; the list holds when each was asked for."""
    asked: list[float] = []

    async def receive() -> Message:
        asked.append(time.monotonic())
        if len(asked) <= len(chunks):
            return {"type": "http.request", "body": chunks[len(asked) - 1], "more_body": True}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive, asked


# --------------------------------------------------------------------------- what reaches the endpoint


async def test_multipart_files_reach_the_endpoint_in_order_with_their_names_and_bytes(
        client: httpx.AsyncClient) -> None:
    """Every part with a file name is an image, whatever its field; the endpoint reads an empty body."""
    a, b, c = PNG, PNG[::-1], b"\x00" * LIMITS.max_file_bytes  # the last one exactly at the limit
    r = await client.post("/skin", files=files(("a.png", a), ("b.png", b)) + files(("c.dcm", c), field="file"))
    seen = reached(r)
    assert (seen["method"], seen["path"], seen["body_len"]) == ("POST", "/skin", 0)
    assert seen["parsed"]["uploads"] == [
        {"index": i, "filename": name, "size": len(data), "sha256": sha(data), "status": 200, "error": ""}
        for i, (name, data) in enumerate([("a.png", a), ("b.png", b), ("c.dcm", c)])]
    assert seen["parsed"]["top_k"] is None and seen["parsed"]["target"] is None


async def test_a_file_over_the_limit_is_refused_alone_and_the_others_go_on(client: httpx.AsyncClient) -> None:
    r = await client.post("/skin", files=files(("a.png", PNG), ("big.png", BIG), ("c.png", PNG)))
    uploads = reached(r)["parsed"]["uploads"]
    assert [(u["filename"], u["status"]) for u in uploads] == [("a.png", 200), ("big.png", 413), ("c.png", 200)]
    assert uploads[1]["size"] is None and FILE_LIMIT in uploads[1]["error"]
    assert uploads[2]["index"] == 2 and uploads[2]["sha256"] == sha(PNG)


async def test_text_in_the_images_field_is_refused_per_item_and_never_fetched(client: httpx.AsyncClient) -> None:
    """BentoML downloads a URL sent as text in a file field; the guard refuses it for that item only,
    and the URL's host sees no connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
        long_url = url + "?" + "q" * 100
        form = [("images", (None, url.encode())), *files(("a.png", PNG)), ("images", (None, long_url.encode()))]
        uploads = reached(await client.post("/skin", files=form))["parsed"]["uploads"]
        with pytest.raises(TimeoutError):
            listener.accept()
    assert [(u["index"], u["status"]) for u in uploads] == [(0, 400), (1, 200), (2, 400)]
    for u in (uploads[0], uploads[2]):
        assert u["filename"] == "images" and u["size"] is None
        assert "not a file" in u["error"] and "fetches no URLs" in u["error"]
    assert url in uploads[0]["error"]
    assert long_url[:60] + "…" in uploads[2]["error"] and long_url not in uploads[2]["error"]


@pytest.mark.parametrize("ctype", ["image/png", "IMAGE/JPEG; q=1", "application/dicom", "application/octet-stream"])
async def test_a_raw_image_body_is_one_upload_named_body(client: httpx.AsyncClient, ctype: str) -> None:
    seen = reached(await client.post("/skin", content=PNG, headers={"content-type": ctype}))
    assert seen["parsed"]["uploads"] == [
        {"index": 0, "filename": "body", "size": len(PNG), "sha256": sha(PNG), "status": 200, "error": ""}]
    assert seen["body_len"] == 0


async def test_a_raw_body_over_the_file_limit_is_refused_as_an_item(client: httpx.AsyncClient) -> None:
    r = await client.post("/skin", content=BIG, headers={"content-type": "image/png"})
    uploads = reached(r)["parsed"]["uploads"]
    assert [(u["filename"], u["status"], u["size"]) for u in uploads] == [("body", 413, None)]
    assert FILE_LIMIT in uploads[0]["error"]


# --------------------------------------------------------------------------- whole requests refused


def _chunks(total: int, size: int = 10_000, first: bytes = b"") -> Callable[[], AsyncIterator[bytes]]:
    """A body of ``total`` bytes sent chunked (no Content-Length), starting with ``first``."""

    async def gen() -> AsyncIterator[bytes]:
        yield first
        for _ in range(total // size):
            yield bytes(size)

    return gen


REFUSALS: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "no file, only top_k": (lambda: {"files": [("top_k", (None, b"2"))]}, 400, "no image in the request"),
    "empty multipart form": (lambda: dict(zip(("content", "headers"), multipart(), strict=True)), 400,
                             "no image in the request"),
    "unknown form field": (lambda: {"files": files(("a.png", PNG)) + [("colour", (None, b"red"))]}, 400,
                           "unexpected form field 'colour'"),
    "text in a field other than images": (lambda: {"files": [("file", (None, b"http://x/a.png"))]}, 400,
                                          "unexpected form field 'file'"),
    "too many files": (lambda: {"files": files(*[(f"{i}.png", PNG) for i in range(LIMITS.max_images + 1)])}, 413,
                       f"more than {LIMITS.max_images} images in one request"),
    "too many text fields": (lambda: {"files": files(("a.png", PNG)) + [("top_k", (None, b"1"))] * 11}, 400,
                             "Too many fields"),
    "a text field over 64 KB": (lambda: {"files": files(("a.png", PNG)) + [("images", (None, b"x" * 70_000))]}, 400,
                                "a text form field is longer than 64 KB"),
    "multipart without a boundary": (lambda: {"content": b"--x\r\n", "headers": {
        "content-type": "multipart/form-data"}}, 400, "malformed multipart body"),
    "malformed multipart": (lambda: {"content": b"garbage", "headers": {
        "content-type": "multipart/form-data; boundary=abc"}}, 400, "malformed multipart body"),
    "part without a name": (lambda: dict(zip(("content", "headers"), multipart(file_part(b'filename="a.png"')),
                                             strict=True)), 400, "malformed multipart body"),
    "JSON body": (lambda: {"json": {"images": ["http://x/a.png"]}}, 415, "send multipart/form-data"),
    "urlencoded form": (lambda: {"data": {"images": "http://x/a.png"}}, 415, "send multipart/form-data"),
    "text/plain body": (lambda: {"content": PNG, "headers": {"content-type": "text/plain"}}, 415, "image/*"),
    "no content type": (lambda: {"content": PNG}, 415, "application/dicom"),
    "Content-Length above the limit (raw)": (lambda: {"content": bytes(LIMITS.max_request_bytes + 1), "headers": {
        "content-type": "image/png"}}, 413, REQUEST_LIMIT),
    "Content-Length above the limit (multipart)": (lambda: {"files": files(("a.png", bytes(LIMITS.max_request_bytes)))},
                                                   413, REQUEST_LIMIT),
    "chunked body growing past the limit (raw)": (lambda: {"content": _chunks(LIMITS.max_request_bytes + 10_000)(),
                                                           "headers": {"content-type": "image/png"}}, 413,
                                                  REQUEST_LIMIT),
    "chunked body growing past the limit (multipart)": (lambda: {
        "content": _chunks(LIMITS.max_request_bytes + 10_000,
                           first=b"--b\r\n" + file_part(b'name="images"; filename="a.png"'))(),
        "headers": {"content-type": "multipart/form-data; boundary=b"}}, 413, REQUEST_LIMIT),
    "Content-Length not a number": (lambda: {"content": PNG, "headers": {"content-type": "image/png",
                                                                          "content-length": "abc"}}, 400,
                                    "invalid Content-Length header"),
    "Content-Length negative": (lambda: {"content": PNG, "headers": {"content-type": "image/png",
                                                                      "content-length": "-1"}}, 400,
                                "invalid Content-Length header"),
    "top_k not a number (form)": (lambda: {"files": files(("a.png", PNG)), "data": {"top_k": "many"}}, 400,
                                  "top_k must be a positive integer, not 'many'"),
    "top_k zero (query)": (lambda: {"files": files(("a.png", PNG)), "params": {"top_k": "0"}}, 400,
                           "top_k must be a positive integer, not '0'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_request_is_refused_as_a_whole_with_status_and_reason(client: httpx.AsyncClient,
                                                                          case: str) -> None:
    make, status, phrase = REFUSALS[case]
    r = await client.post("/skin", **make())
    refused(r, status, phrase)
    assert r.json()["task"] == "skin"
    assert reached(await client.post("/skin", files=files(("ok.png", PNG))))["parsed"]["uploads"][0]["status"] == 200


async def test_the_refusal_names_the_route_it_was_sent_to(client: httpx.AsyncClient) -> None:
    for route in ("/pathology_ensemble", "/skin/explain"):
        r = await client.post(route, json={})
        refused(r, 415, "send multipart/form-data")
        assert r.json()["task"] == route.strip("/")


@pytest.mark.parametrize("ctype", ["image/png", "multipart/form-data; boundary=b"])
async def test_a_content_length_above_the_limit_is_refused_before_a_byte_is_read(ctype: str) -> None:
    asked: list[int] = []

    async def receive() -> Message:
        asked.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"content-type", ctype.encode()), (b"content-length", str(LIMITS.max_request_bytes + 1).encode())]
    status, hdrs, body = await call(guard(), http_scope("POST", "/skin", headers), receive)
    assert (status, json.loads(body)["error"], hdrs[b"connection"]) == (413, REQUEST_LIMIT, b"close")
    assert not asked


async def test_a_content_length_of_non_ascii_digits_is_refused_with_400() -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": PNG, "more_body": False}

    headers = [(b"content-type", b"image/png"), (b"content-length", "\u00b2".encode("latin-1"))]
    status, _, body = await call(guard(), http_scope("POST", "/skin", headers), receive)
    assert (status, json.loads(body)["error"]) == (400, "invalid Content-Length header")


# --------------------------------------------------------------------------- top_k and target


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"data": {"top_k": "3"}}, 3),
    ({"data": {"top_k": '"3"'}}, 3),  # BentoML's clients send form values JSON-encoded
    ({"data": {"top_k": " 4 "}}, 4),
    ({"data": {"top_k": "null"}}, None),
    ({"data": {"top_k": ""}}, None),
    ({"params": {"top_k": "2"}}, 2),
    ({"params": {"top_k": "2"}, "data": {"top_k": "5"}}, 5),  # the form wins over the query
    ({}, None),
], ids=["form", "form JSON-encoded", "form with spaces", "form null", "form empty", "query", "form over query",
        "none"])
async def test_top_k_from_the_form_or_the_query(client: httpx.AsyncClient, kwargs: dict[str, Any],
                                                expected: int | None) -> None:
    assert reached(await client.post("/skin", files=files(("a.png", PNG)), **kwargs))["parsed"]["top_k"] == expected


@pytest.mark.parametrize("value", ["\u0663", "\u00b2", "+3", "1_0", "-1", "0", "3.0", '""', "three"])
@pytest.mark.parametrize("where", ["data", "params"])
async def test_top_k_takes_ascii_digits_only(client: httpx.AsyncClient, value: str, where: str) -> None:
    r = await client.post("/skin", files=files(("a.png", PNG)), **{where: {"top_k": value}})
    refused(r, 400, f"top_k must be a positive integer, not {value!r}")


def test_parse_top_k_directly() -> None:
    assert [parse_top_k(v) for v in (None, "", " null ", "7", '"12"')] == [None, None, None, 7, 12]
    with pytest.raises(Problem) as e:
        parse_top_k("\u0663")
    assert (e.value.status, e.value.headers) == (400, {})


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"data": {"target": "benign"}}, "benign"),
    ({"data": {"target": '"benign"'}}, "benign"),  # JSON-encoded by BentoML's clients
    ({"data": {"target": "3"}}, "3"),
    ({"data": {"target": "null"}}, None),
    ({"data": {"target": ""}}, None),
    ({"params": {"target": "malignant"}}, "malignant"),
    ({"params": {"target": "malignant"}, "data": {"target": "benign"}}, "benign"),  # the form wins
], ids=["form", "form JSON-encoded", "form number", "form null", "form empty", "query", "form over query"])
async def test_target_from_the_form_or_the_query(client: httpx.AsyncClient, kwargs: dict[str, Any],
                                                 expected: str | None) -> None:
    seen = reached(await client.post("/skin/explain", files=files(("a.png", PNG)), **kwargs))
    assert seen["path"] == "/skin/explain" and seen["parsed"]["target"] == expected


def test_parse_target_directly() -> None:
    assert [parse_target(v) for v in ("benign", '"benign"', "2", "null", '""', "")] == [
        "benign", "benign", "2", None, None, None]


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize(("disposition", "shown"), [
    (b'name="images"; filename="caf\xe9.png"', "caf\\xe9.png"),  # latin-1, not UTF-8: zoo score's \xNN rule
    (b'name="images"; filename="caf\xc3\xa9.png"', "caf\u00e9.png"),  # UTF-8: kept
    (b'name="images"; filename="\xff\xfe.png"', "\\xff\\xfe.png"),
    (b'name="scan"; filename=""', "scan"),  # no name: the field's
], ids=["latin-1", "utf-8", "invalid bytes", "empty"])
async def test_file_names_come_back_by_the_one_display_rule(client: httpx.AsyncClient, disposition: bytes,
                                                            shown: str) -> None:
    content, headers = multipart(file_part(disposition))
    uploads = reached(await client.post("/skin", content=content, headers=headers))["parsed"]["uploads"]
    assert [(u["filename"], u["status"], u["sha256"]) for u in uploads] == [(shown, 200, sha(PNG))]


async def test_a_utf8_file_name_sent_by_httpx_is_kept(client: httpx.AsyncClient) -> None:
    uploads = reached(await client.post("/skin", files=files(("\u80ba-caf\u00e9.png", PNG))))["parsed"]["uploads"]
    assert uploads[0]["filename"] == "\u80ba-caf\u00e9.png"


# --------------------------------------------------------------------------- /models and /stats


@pytest.mark.parametrize("route", GET_ROUTES)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_models_and_stats_answer_get_and_post_without_a_body_or_with_json(
        client: httpx.AsyncClient, route: str, method: str) -> None:
    """The typed endpoints are POSTs: a GET (curl) reaches them as one; the JSON object BentoML's clients
    send goes through untouched."""
    seen = reached(await client.request(method, route))
    assert (seen["method"], seen["path"], seen["body_len"], seen["parsed"]) == ("POST", route, 0, None)
    seen = reached(await client.request(method, route, json={}))
    assert (seen["method"], seen["body_sha256"]) == ("POST", sha(b"{}"))


@pytest.mark.parametrize("route", GET_ROUTES)
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("body", ["multipart", "raw bytes", "chunked"])
async def test_models_and_stats_refuse_a_body_that_is_not_json(client: httpx.AsyncClient, route: str, method: str,
                                                               body: str) -> None:
    kwargs: dict[str, Any] = {
        "multipart": {"files": files(("a.png", PNG))},
        "raw bytes": {"content": b"\xff\xfe raw bytes", "headers": {"content-type": "text/plain"}},
        "chunked": {"content": _chunks(20_000)()},
    }[body]
    r = await client.request(method, route, **kwargs)
    refused(r, 400, f"{route} takes no request body (or a JSON object)")


@pytest.mark.parametrize("route", GET_ROUTES)
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_models_and_stats_refuse_other_methods_with_405_and_allow(client: httpx.AsyncClient, route: str,
                                                                        method: str) -> None:
    r = await client.request(method, route, content=b"{}" if method in ("PUT", "PATCH") else None)
    assert r.status_code == 405 and "x-endpoint" not in r.headers
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    if method != "HEAD":
        assert r.json()["error"] == f"{route} answers GET and POST, not {method}"


# --------------------------------------------------------------------------- what the guard leaves alone


@pytest.mark.parametrize(("method", "path"), [("POST", "/livez"), ("POST", "/skin/other"), ("POST", "/skins"),
                                              ("GET", "/skin"), ("PUT", "/skin"), ("GET", "/docs.json")])
async def test_routes_and_methods_the_guard_does_not_own_pass_through_untouched(
        client: httpx.AsyncClient, method: str, path: str) -> None:
    """Even a body the guard would refuse on an upload route (a JSON body, over the request limit)."""
    big = bytes(LIMITS.max_request_bytes + 1)
    seen = reached(await client.request(method, path, content=big, headers={"content-type": "application/json"}))
    assert (seen["method"], seen["path"], seen["parsed"]) == (method, path, None)
    assert (seen["body_len"], seen["body_sha256"]) == (len(big), sha(big))


async def test_non_http_scopes_pass_through() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Any) -> None:
        seen.append(scope)

    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}}
    websocket = {**http_scope("GET", "/skin", []), "type": "websocket"}
    for scope in (lifespan, websocket):
        await UploadGuard(app, UPLOAD_ROUTES, GET_ROUTES, LIMITS)(scope, stalling()[0], None)  # type: ignore[arg-type]
    assert seen == [lifespan, websocket]


async def test_after_the_guard_the_endpoint_reads_an_empty_body_then_the_clients_messages() -> None:
    """The body is consumed: the endpoint gets one empty body message, then what the client sends next."""
    later: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Any) -> None:
        later.extend([await receive(), await receive()])

    messages = iter([{"type": "http.request", "body": PNG, "more_body": False}, {"type": "http.disconnect"}])

    async def receive() -> Message:
        return next(messages)

    await UploadGuard(app, UPLOAD_ROUTES, GET_ROUTES, LIMITS)(
        http_scope("POST", "/skin", [(b"content-type", b"image/png")]), receive, None)  # type: ignore[arg-type]
    assert later == [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]


# --------------------------------------------------------------------------- stalled and vanished uploads


async def test_body_stream_gives_408_when_the_client_sends_nothing_for_the_body_timeout() -> None:
    receive, asked = stalling(b"first", b"second")
    got: list[bytes] = []
    t0 = time.monotonic()
    with pytest.raises(Problem) as e, anyio.fail_after(3):
        async for chunk in body_stream(receive, LIMITS):
            got.append(chunk)
    took = time.monotonic() - t0
    assert (e.value.status, e.value.message) == (408, "the upload stalled: no data for 0.2 s")
    assert got == [b"first", b"second"] and len(asked) == 3
    assert LIMITS.body_timeout_s - 0.05 < took < LIMITS.body_timeout_s + 1


async def test_a_slow_upload_that_keeps_sending_is_not_cut_off() -> None:
    """The timeout is per pause, not for the whole body: five pauses of half the timeout pass."""
    chunks = [bytes([i]) * 10 for i in range(5)]

    async def receive() -> Message:
        await anyio.sleep(LIMITS.body_timeout_s / 2)
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    parsed = await read_request(http_scope("POST", "/skin", [(b"content-type", b"image/png")]), receive, LIMITS)
    assert parsed.uploads[0].data == b"".join(bytes([i]) * 10 for i in range(5))


@pytest.mark.parametrize("kind", ["raw body", "multipart"])
async def test_read_request_gives_408_on_a_stalled_upload(kind: str) -> None:
    if kind == "raw body":
        ctype, first = b"image/png", PNG[:20]
    else:
        ctype, first = b"multipart/form-data; boundary=b0", b'--b0\r\n' + file_part(b'name="images"; filename="a.png"')
    receive, _ = stalling(first)
    scope = http_scope("POST", "/skin", [(b"content-type", ctype), (b"content-length", b"5000")])
    with pytest.raises(Problem) as e, anyio.fail_after(3):
        await read_request(scope, receive, LIMITS)
    assert e.value.status == 408 and "stalled" in e.value.message


async def test_the_guard_answers_a_stalled_upload_with_408_and_the_endpoint_is_not_called() -> None:
    receive, _ = stalling(PNG[:20])
    scope = http_scope("POST", "/skin", [(b"content-type", b"image/png"), (b"content-length", b"5000")])
    t0 = time.monotonic()
    with anyio.fail_after(3):
        status, headers, body = await call(guard(), scope, receive)
    assert time.monotonic() - t0 < LIMITS.body_timeout_s + 1
    assert (status, headers[b"connection"]) == (408, b"close")
    assert json.loads(body) == {"error": "the upload stalled: no data for 0.2 s", "task": "skin"}


@pytest.mark.parametrize("ctype", [b"image/png", b"multipart/form-data; boundary=b0"])
async def test_a_client_that_goes_away_mid_upload_gets_400(ctype: bytes) -> None:
    messages = iter([{"type": "http.request", "body": b"--b0\r\n", "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> Message:
        return next(messages)

    with pytest.raises(Problem) as e:
        await read_request(http_scope("POST", "/skin", [(b"content-type", ctype)]), receive, LIMITS)
    assert (e.value.status, e.value.message) == (400, "the client disconnected before the upload was complete")


# --------------------------------------------------------------------------- in-process calls


def test_as_uploads_takes_what_the_guard_read_bytes_and_paths(tmp_path: Path) -> None:
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(PNG)
    big.write_bytes(BIG)
    read = Upload(0, "from-http.png", data=PNG)
    out = as_uploads([read, PNG, bytearray(PNG), memoryview(PNG), small, str(big)], LIMITS.max_file_bytes)
    assert out[0] is read
    assert [(u.index, u.filename, u.status, u.data) for u in out[1:5]] == [
        (1, "image-1", 200, PNG), (2, "image-2", 200, PNG), (3, "image-3", 200, PNG), (4, "small.png", 200, PNG)]
    assert (out[5].filename, out[5].status, out[5].data) == ("big.png", 413, None) and FILE_LIMIT in out[5].error
