"""The adversarial suite runs against the real gateway, like the black-box tests, and shares
their fixtures — including the autouse check that no body the gateway writes leaks a
traceback, a file path, SQL or key material (CONTRACT §7)."""

from tests.blackbox.conftest import (  # noqa: F401 - fixtures are found by name
    echo_upstream,
    fresh_gateway,
    gateway,
    no_leaks_in_any_response,
)
