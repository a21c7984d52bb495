"""The gateway's error tree: every failure a client can see, with its HTTP status.

Library code raises these; one middleware (``gateway.middleware``) turns them into
``application/problem+json`` (RFC 9457). ``detail`` is written for the client and must
never hold a token, SQL, a file path or key material.

    GatewayError
    ├── BadRequest (400) ── InvalidPath, InvalidInput
    ├── Unauthorized (401) ── InvalidCredentials, InvalidToken
    ├── Forbidden (403) ── InsufficientScope, RegistrationClosed, CsrfRejected
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── RequestTimeout (408)
    ├── Conflict (409) ── EmailTaken
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── RequestHeaderFieldsTooLarge (431)
    ├── TooManyRequests (429)
    ├── BadGateway (502)
    ├── ServiceUnavailable (503) ── Overloaded
    └── GatewayTimeout (504)

``ConfigError`` is separate: it is an operator's mistake, reported by the CLI, never over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """A failure with a status, a stable machine code and a human detail."""

    status = 500
    code = "internal_error"
    title = "Internal Server Error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)


class BadRequest(GatewayError):
    status, code, title = 400, "bad_request", "Bad Request"


class InvalidPath(BadRequest):
    code, title = "invalid_path", "Invalid Path"


class InvalidInput(BadRequest):
    code, title = "invalid_input", "Invalid Input"


class Unauthorized(GatewayError):
    """401. ``bearer_error`` becomes ``error="..."`` in WWW-Authenticate (RFC 6750 §3)."""

    status, code, title = 401, "unauthorized", "Unauthorized"
    bearer_error: str | None = None


class InvalidCredentials(Unauthorized):
    code, title = "invalid_credentials", "Invalid Credentials"


class InvalidToken(Unauthorized):
    """A presented token was refused; ``reason`` is for metrics and logs, never echoed raw."""

    code, title = "invalid_token", "Invalid Token"
    bearer_error = "invalid_token"

    def __init__(self, reason: str = "invalid", detail: str | None = None) -> None:
        self.reason = reason
        super().__init__(detail or "The access token is invalid or expired.")


class Forbidden(GatewayError):
    status, code, title = 403, "forbidden", "Forbidden"
    bearer_error: str | None = None


class InsufficientScope(Forbidden):
    code, title = "insufficient_scope", "Insufficient Scope"
    bearer_error = "insufficient_scope"


class RegistrationClosed(Forbidden):
    code, title = "registration_closed", "Registration Closed"


class CsrfRejected(Forbidden):
    code, title = "csrf_rejected", "Cross-Site Request Rejected"


class NotFound(GatewayError):
    status, code, title = 404, "not_found", "Not Found"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method Not Allowed"

    def __init__(self, allowed: tuple[str, ...], detail: str | None = None) -> None:
        self.allowed = allowed
        super().__init__(detail)


class RequestTimeout(GatewayError):
    status, code, title = 408, "request_timeout", "Request Timeout"


class Conflict(GatewayError):
    status, code, title = 409, "conflict", "Conflict"


class EmailTaken(Conflict):
    code, title = "email_taken", "Email Already Registered"


class PayloadTooLarge(GatewayError):
    status, code, title = 413, "payload_too_large", "Payload Too Large"


class UnsupportedMediaType(GatewayError):
    status, code, title = 415, "unsupported_media_type", "Unsupported Media Type"


class RequestHeaderFieldsTooLarge(GatewayError):
    status, code, title = 431, "request_header_fields_too_large", "Request Header Fields Too Large"


class TooManyRequests(GatewayError):
    status, code, title = 429, "too_many_requests", "Too Many Requests"

    def __init__(self, retry_after: int, detail: str | None = None) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(detail)


class BadGateway(GatewayError):
    status, code, title = 502, "bad_gateway", "Bad Gateway"


class ServiceUnavailable(GatewayError):
    status, code, title = 503, "service_unavailable", "Service Unavailable"


class Overloaded(ServiceUnavailable):
    """More work queued than the gateway will hold; the client should retry shortly."""

    code, title = "overloaded", "Overloaded"

    def __init__(self, retry_after: int, detail: str | None = None) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(detail)


class GatewayTimeout(GatewayError):
    status, code, title = 504, "gateway_timeout", "Gateway Timeout"


@dataclass(frozen=True)
class ConfigProblem:
    """One operator mistake, printed as ``FILE:LINE: dotted.path: message``."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; carries every problem found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
