"""Request smuggling against the running gateway, over raw sockets.

The upstream is the counting one (tests/blackbox/upstreams.py): after each attack the test
asks it, directly, what arrived. A refused request must be a 400 (431 for an oversized head)
as problem+json, the connection must be closed after it (nothing behind the refused bytes is
read as a request), and the upstream must have received nothing at all for it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.blackbox.client import assert_no_leak
from tests.blackbox.conftest import (
    ROUTES,
    Echo,
    Gateway,
    free_port,
    launch_gateway,
    stop_process,
    wait_until_up,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the gateway closed the connection after this response
    at: float = 0.0  # time.monotonic() when the response head arrived

    def json(self) -> Any:
        return json.loads(self.body)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10.0) -> Reply:
    """One response (Content-Length or chunked), then whether the gateway hung up."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    at = time.monotonic()
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        closed = await asyncio.wait_for(reader.read(1), 3) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    if "x-upstream" not in headers:
        assert_no_leak(body, lines[0])
    return Reply(int(lines[0].split(" ")[1]), headers, body, closed, at)


async def exchange(base: str, data: bytes) -> Reply:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await read_reply(reader)
    finally:
        writer.close()


async def replies(base: str, data: bytes, count: int) -> list[Reply]:
    """Up to ``count`` responses to pipelined ``data`` (fewer if the gateway hangs up)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    out: list[Reply] = []
    try:
        writer.write(data)
        while len(out) < count:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            out.append(Reply(int(lines[0].split(" ")[1]), headers, body, False))
    finally:
        writer.close()
    return out


@dataclass
class Counting:
    url: str
    proc: subprocess.Popen[bytes]

    def counters(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/__counters", timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
            return data


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Counting]:
    workdir = tmp_path_factory.mktemp("counting")
    port = free_port()
    with open(workdir / "upstream.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.blackbox.upstreams", "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ready", proc)
        yield Counting(f"http://127.0.0.1:{port}", proc)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def smuggle_gw(tmp_path_factory: pytest.TempPathFactory, counting: Counting) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("smuggle-gw")
    port = int(counting.url.rsplit(":", 1)[1])
    gw = launch_gateway(workdir, Echo(counting.url, port), routes=ROUTES)
    yield gw
    stop_process(gw.proc)


def post(path: str, *headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/" + version + b"\r\nHost: 127.0.0.1\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"


def follower(name: str) -> bytes:
    """A request pipelined behind an attack: it must be neither answered nor forwarded."""
    return f"GET /public/follower-{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


# name -> (headers, body); each is POSTed to /public/<name>, and a follower request is
# pipelined behind it, which must never be answered (or forwarded) either.
REFUSED: dict[str, tuple[list[bytes], bytes]] = {
    "cl-te": ([b"Content-Length: 4", b"Transfer-Encoding: chunked"], CHUNKED_ABC),
    "te-cl": ([b"Transfer-Encoding: chunked", b"Content-Length: 4"], CHUNKED_ABC),
    "cl-duplicate": ([b"Content-Length: 3", b"Content-Length: 3"], b"abc"),
    "cl-conflicting": ([b"Content-Length: 3", b"Content-Length: 40"], b"abc"),
    "cl-list": ([b"Content-Length: 3, 3"], b"abc"),
    "cl-plus": ([b"Content-Length: +3"], b"abc"),
    "cl-negative": ([b"Content-Length: -3"], b"abc"),
    "cl-hex": ([b"Content-Length: 0x3"], b"abc"),
    "cl-space-inside": ([b"Content-Length: 1 0"], b"abc"),
    "cl-overflow": ([b"Content-Length: 99999999999999999999999999"], b"abc"),
    "te-xchunked": ([b"Transfer-Encoding: xchunked"], CHUNKED_ABC),
    "te-chunked-identity": ([b"Transfer-Encoding: chunked, identity"], CHUNKED_ABC),
    "te-identity": ([b"Transfer-Encoding: identity"], b"abc"),
    "te-identity-cl": ([b"Transfer-Encoding: identity", b"Content-Length: 3"], b"abc"),
    "te-gzip-chunked": ([b"Transfer-Encoding: gzip, chunked"], CHUNKED_ABC),
    "te-chunked-gzip": ([b"Transfer-Encoding: chunked, gzip"], CHUNKED_ABC),
    "te-twice": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], CHUNKED_ABC),
    "te-space-before-colon": ([b"Transfer-Encoding : chunked"], CHUNKED_ABC),
    "te-vertical-tab": ([b"Transfer-Encoding: \x0bchunked"], CHUNKED_ABC),
    "te-obs-text": ([b"Transfer-Encoding: chunked\xff"], CHUNKED_ABC),
    "te-nul": ([b"Transfer-Encoding: chunked\x00"], CHUNKED_ABC),
    # Trailing OWS is allowed by RFC 9110 but llhttp refuses it: refused, consistently.
    "te-trailing-tab": ([b"Transfer-Encoding: chunked\t"], CHUNKED_ABC),
    "te-obs-fold": ([b"Transfer-Encoding:", b" chunked", b"Content-Length: 3"], b"abc"),
    "obs-fold": ([b"X-Folded: one", b"  two", b"Content-Length: 3"], b"abc"),
    "obs-fold-tab": ([b"X-Folded: one", b"\ttwo", b"Content-Length: 3"], b"abc"),
    "nul-in-value": ([b"X-A: a\x00b", b"Content-Length: 3"], b"abc"),
    "cr-in-value": ([b"X-A: a\rb", b"Content-Length: 3"], b"abc"),
    "bare-lf-in-head": ([b"X-A: a\nX-B: b", b"Content-Length: 3"], b"abc"),
    "space-before-colon": ([b"Content-Length : 3"], b"abc"),
    "tab-before-colon": ([b"Content-Length\t: 3"], b"abc"),
    "empty-header-name": ([b": x", b"Content-Length: 3"], b"abc"),
    "chunk-size-junk": ([b"Transfer-Encoding: chunked"], b"3x\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-space": ([b"Transfer-Encoding: chunked"], b"3 \r\nabc\r\n0\r\n\r\n"),
    "chunk-size-overflow": ([b"Transfer-Encoding: chunked"], b"1" * 20 + b"\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-negative": ([b"Transfer-Encoding: chunked"], b"-3\r\nabc\r\n0\r\n\r\n"),
    "chunk-ext-bare-lf": ([b"Transfer-Encoding: chunked"], b"3;a\nb\r\nabc\r\n0\r\n\r\n"),
    "chunk-data-too-long": ([b"Transfer-Encoding: chunked"], b"3\r\nabcd\r\n0\r\n\r\n"),
    "chunk-bare-lf": ([b"Transfer-Encoding: chunked"], b"3\nabc\n0\n\n"),
    "trailer-content-length": (
        [b"Transfer-Encoding: chunked"],
        b"3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n",
    ),
    "trailer-obs-fold": ([b"Transfer-Encoding: chunked"], b"3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_ambiguous_framing_is_refused_and_nothing_is_forwarded(
    smuggle_gw: Gateway, counting: Counting, name: str
) -> None:
    headers, body = REFUSED[name]
    reply = await exchange(
        smuggle_gw.url, post(f"/public/{name}", *headers, body=body) + follower(name)
    )
    assert reply.status == 400, reply.body
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["status"] == 400
    assert reply.closed, "the connection must not be read past a refused request"
    seen = counting.counters()
    assert f"/public/{name}" not in seen
    assert f"/public/follower-{name}" not in seen


LINE_REFUSALS: dict[str, bytes] = {
    "bare-lf-request-line": b"GET {p} HTTP/1.1\nHost: 127.0.0.1\n\n",
    "http-0.9": b"GET {p}\r\n\r\n",
    "http-1.2": b"GET {p} HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n",
    "http-1.0-te": b"POST {p} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_ABC,
    "http-1.0-te-cl": (
        b"POST {p} HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "lowercase-method": b"get {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "space-in-method": b"G ET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "no-host": b"GET {p} HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET {p} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(LINE_REFUSALS))
async def test_malformed_request_lines_are_refused(
    smuggle_gw: Gateway, counting: Counting, name: str
) -> None:
    path = f"/public/line-{name}"
    reply = await exchange(
        smuggle_gw.url, LINE_REFUSALS[name].replace(b"{p}", path.encode()) + follower(name)
    )
    assert (reply.status, reply.closed) == (400, True)
    assert reply.headers["content-type"] == "application/problem+json"
    seen = counting.counters()
    assert path not in seen and f"/public/follower-{name}" not in seen


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("long-value", b"X-Big: " + b"a" * 20_000),
        ("long-name", b"X-" + b"a" * 20_000 + b": 1"),
        ("many-headers", b"\r\n".join(b"X-H%d: 1" % i for i in range(150))),
        ("long-cookie", b"Cookie: " + b"c=" + b"v" * 17_000),
    ],
)
async def test_oversized_heads_are_431(
    smuggle_gw: Gateway, counting: Counting, name: str, header: bytes
) -> None:
    reply = await exchange(smuggle_gw.url, post(f"/public/{name}", header, b"Content-Length: 0"))
    assert (reply.status, reply.closed) == (431, True)
    assert reply.headers["content-type"] == "application/problem+json"
    assert f"/public/{name}" not in counting.counters()


@pytest.mark.parametrize(
    ("name", "headers", "body"),
    [
        ("chunked", [b"Transfer-Encoding: chunked"], CHUNKED_ABC),
        ("chunked-upper", [b"Transfer-Encoding: CHUNKED"], CHUNKED_ABC),
        ("chunked-ows", [b"Transfer-Encoding:\t Chunked"], CHUNKED_ABC),
        ("chunk-ext", [b"Transfer-Encoding: chunked"], b"3;name=value\r\nabc\r\n0;x\r\n\r\n"),
        ("chunk-ext-quoted", [b"Transfer-Encoding: chunked"], b'3;n="a b;c"\r\nabc\r\n0\r\n\r\n'),
        ("trailer", [b"Transfer-Encoding: chunked"], b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"),
        ("split-chunks", [b"Transfer-Encoding: chunked"], b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n"),
        ("content-length", [b"Content-Length: 3"], b"abc"),
    ],
)
async def test_valid_framing_is_forwarded_exactly(
    smuggle_gw: Gateway, counting: Counting, name: str, headers: list[bytes], body: bytes
) -> None:
    """Chunk extensions and trailers are valid HTTP/1.1: accepted, and the upstream gets the
    decoded body (re-framed by the gateway; extensions and trailers are not relayed)."""
    path = f"/public/valid-{name}/hash"
    reply = await exchange(smuggle_gw.url, post(path, *headers, b"Connection: close", body=body))
    assert reply.status == 200, reply.body
    assert reply.json()["length"] == 3
    assert reply.json()["sha256"] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert counting.counters()[path]["completed"] == 1


async def test_a_request_in_a_body_stays_body(smuggle_gw: Gateway, counting: Counting) -> None:
    hidden = b"GET /api/hidden-in-body HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    request = post(
        "/public/carrier", b"Content-Length: %d" % len(hidden), b"Connection: close", body=hidden
    )
    reply = await exchange(smuggle_gw.url, request)
    assert reply.status == 200 and reply.closed
    assert reply.json()["body"] == hidden.decode()
    seen = counting.counters()
    assert seen["/public/carrier"]["requests"] == 1
    assert "/api/hidden-in-body" not in seen


@pytest.mark.parametrize(
    "carrier",
    [
        post("/public/pipe-cl0", b"Content-Length: 0"),
        post("/public/pipe-chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        b"GET /public/pipe-get HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
)
async def test_a_pipelined_request_is_judged_on_its_own(
    smuggle_gw: Gateway, counting: Counting, carrier: bytes
) -> None:
    """A request behind another gets its own policy check: /api needs a token."""
    hidden = b"GET /api/pipelined HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    first, second = await replies(smuggle_gw.url, carrier + hidden, 2)
    assert first.status == 200 and "x-upstream" in first.headers
    assert second.status == 401
    assert "/api/pipelined" not in counting.counters()


async def test_a_malformed_request_behind_a_good_one_is_never_forwarded(
    smuggle_gw: Gateway, counting: Counting
) -> None:
    good = b"GET /public/before-bad HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    bad = post(
        "/public/after-good", b"Content-Length: 3", b"Transfer-Encoding: chunked", body=CHUNKED_ABC
    )
    got = await replies(smuggle_gw.url, good + bad + follower("after-good"), 3)
    assert [r.status for r in got][-1] == 400
    assert all(r.status in (200, 400) for r in got) and len(got) <= 2
    seen = counting.counters()
    assert "/public/after-good" not in seen and "/public/follower-after-good" not in seen
