"""Paths: one canonical form of a request path, computed from the raw target.

A canonical path starts with ``/``, holds no empty segment (except a trailing ``/``), no dot
segment, no encoded ``/`` or ``\\``, no control character (raw or encoded), only valid UTF-8,
nothing that a second decoding would turn into a separator or a dot segment,
and percent-encodes everything but unreserved characters, sub-delims, ``:`` and ``@`` with
upper-case hex. ``canonical_path`` is idempotent on its own output. Routing and forwarding
both use it, and config checks route prefixes against it, so all three agree.
"""

from __future__ import annotations

import re
import unicodedata

from gateway.errors import InvalidPath

__all__ = ["canonical_path"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Allowed raw in a path segment besides unreserved (RFC 3986 §3.3 pchar); kept as they are,
# and kept encoded when they arrive encoded: decoding them could change a segment's meaning.
_SUB_DELIMS = frozenset(b"!$&'()*+,;=:@")
# Never acceptable raw: they end the path (``?``, ``#``), are a separator on some upstreams
# (``\``), or cannot occur in a well-formed request line (space).
_REFUSED_RAW = frozenset(b"\\#? ")
# Never acceptable encoded: a second separator the router cannot see (CONTRACT §6).
_REFUSED_ENCODED = frozenset(b"/\\")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")

# A whole path that is already canonical: segments neither empty nor starting with "." or
# ";" (so no dot segment, no parameters-only segment), only characters kept raw.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,;=:@]*)+/?|/")
# A segment that is already canonical ASCII: the fast path skips byte-level decoding.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]*")
# Characters some upstreams map onto a separator (NFKC does not cover them all; Windows
# "best fit" code pages do). Refused so that no upstream sees a separator we did not route on.
_SLASH_LOOKALIKES = frozenset("\u2044\u2215\u2216\u29f5\u29f8\u29f9\ufe68\uff0f\uff3c")


def canonical_path(raw_path: str) -> str:
    """Normalize a raw request path (percent-encoded, query already removed).

    Decodes percent-encoded unreserved characters (RFC 3986 §2.3), upper-cases the hex of the
    remaining escapes, removes dot segments (§5.2.4), merges duplicate slashes. Raises
    ``InvalidPath`` for a path that does not start with ``/``, that still holds an encoded
    ``/`` or ``\\``, a dot segment in any encoding (also ``..;x``), a NUL, or bad escapes.
    The result is still percent-encoded and starts with ``/``.

    Also refused: control characters (raw or encoded), a raw ``\\``, ``#``, ``?`` or space,
    bytes that are not UTF-8 (overlong ``%C0%AF`` is a classic slash smuggler), a segment
    holding only dots and spaces (Windows trims trailing dots and spaces), a segment starting
    with ``;``, a segment that looks like a separator or a dot segment after NFKC, and one
    that would hold a separator, a control or a dot segment if an upstream decoded it a second
    time (``%252e%252e``, ``%252f``). Non-ASCII characters and ASCII not allowed raw in a
    path are percent-encoded as UTF-8.
    ``..`` above the root is clamped (``/../x`` is ``/x``); a trailing ``/`` is kept.
    """
    if not isinstance(raw_path, str) or not raw_path.startswith("/"):
        raise InvalidPath("The request path must start with '/'.")
    if _PLAIN_PATH.fullmatch(raw_path):
        return raw_path
    segments = raw_path.split("/")[1:]
    out: list[str] = []
    trailing_slash = False
    for segment in segments:
        # Empty segments cost nothing: a path of 16,000 slashes is not 16,000 checks.
        canonical = _canonical_segment(segment) if segment else ""
        # A trailing slash survives, whatever the last segment removed was (RFC 3986 §5.2.4).
        trailing_slash = canonical in ("", ".", "..")
        if canonical == "..":
            if out:
                out.pop()
        elif canonical not in ("", "."):
            out.append(canonical)
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing_slash else "")


def _canonical_segment(segment: str) -> str:
    """One segment (no raw ``/``) in canonical encoding; ``InvalidPath`` when refused."""
    if _PLAIN_SEGMENT.fullmatch(segment):
        _check_segment_text(segment, segment)
        return segment
    try:
        # aiohttp decodes the request line with surrogateescape: this recovers its bytes.
        raw = segment.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidPath("The request path is not valid.") from None
    canonical, decoded = _recode(raw)
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPath("The request path is not valid UTF-8.") from None
    _check_segment_text(canonical, text)
    if "%" in text:
        _check_decoded_again(text)
    return canonical


def _recode(raw: bytes) -> tuple[str, bytes]:
    """``(canonical encoding, fully decoded bytes)`` of one raw segment."""
    out: list[str] = []
    decoded = bytearray()
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x25:  # "%"
            escape = raw[i + 1 : i + 3]
            if len(escape) != 2 or not all(b in _HEX for b in escape):
                raise InvalidPath("The request path holds an invalid percent-escape.")
            byte = int(escape, 16)
            if byte in _REFUSED_ENCODED:
                raise InvalidPath("The request path holds an encoded '/' or '\\'.")
            out.append(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}")
            i += 3
        else:
            if byte in _REFUSED_RAW:
                raise InvalidPath("The request path holds a character not allowed there.")
            raw_ok = byte in _UNRESERVED or byte in _SUB_DELIMS
            out.append(chr(byte) if raw_ok else f"%{byte:02X}")
            i += 1
        if byte < 0x20 or byte == 0x7F:
            raise InvalidPath("The request path holds a control character.")
        decoded.append(byte)
    return "".join(out), bytes(decoded)


def _check_segment_text(canonical: str, text: str) -> None:
    """Refuse what some upstream could read as a separator or a dot segment.

    ``canonical`` exactly ``.`` or ``..`` is a dot segment the caller removes; anything else
    whose name part (before ``;``) is only dots and spaces is refused: ``..;x`` (Tomcat drops
    the parameters), ``...`` and ``.. `` (Windows trims trailing dots and spaces).
    """
    if canonical in (".", ".."):
        return
    if any(unicodedata.category(ch) == "Cc" for ch in text if ord(ch) >= 0x80):
        raise InvalidPath("The request path holds a control character.")
    if not text.isascii():
        if any(ch in _SLASH_LOOKALIKES for ch in text):
            raise InvalidPath("The request path holds a character that resembles '/'.")
        text = unicodedata.normalize("NFKC", text)
        if "/" in text or "\\" in text:
            raise InvalidPath("The request path holds a character that resembles '/'.")
    name = text.split(";", 1)[0]
    if text and not name:
        raise InvalidPath("The request path holds a segment of only parameters.")
    if name and not name.strip(". "):
        raise InvalidPath("The request path holds a dot segment.")


def _check_decoded_again(text: str) -> None:
    """Refuse a segment that a second decoding would turn into a separator or a dot segment.

    ``%252e%252e`` is ``%2e%2e`` once decoded (the gateway's view, harmless) and ``..`` twice:
    an upstream that decodes again (IIS's double-decode, a framework that unquotes a path it
    received already unquoted) would walk out of the route the policy was evaluated on. Same
    for ``%252f``, ``%255c``, ``%2500`` and overlong ``%25c0%25af``. A literal ``%`` followed
    by anything else (``100%25``, ``%2541``) is data and passes.
    """
    raw = text.encode("utf-8")
    again = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    if again == raw:
        return
    if any(b in _REFUSED_ENCODED or b < 0x20 or b == 0x7F for b in again):
        raise InvalidPath("The request path holds a doubly encoded separator or control.")
    try:
        decoded = again.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPath("The request path is not valid UTF-8 when decoded twice.") from None
    name = decoded.split(";", 1)[0]
    if name and not name.strip(". "):
        raise InvalidPath("The request path holds a doubly encoded dot segment.")
