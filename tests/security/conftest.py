"""The adversarial suite runs against the real gateway, like the black-box tests, and shares
their fixtures — including the autouse check that no body the gateway writes leaks a
traceback, a file path, SQL or key material (CONTRACT §7)."""

import asyncio

import aiohttp
import pytest

from tests.blackbox.client import Account, signed_in
from tests.blackbox.conftest import (  # noqa: F401 - fixtures are found by name
    Gateway,
    echo_upstream,
    fresh_gateway,
    gateway,
    no_leaks_in_any_response,
)


@pytest.fixture(scope="module")
def user(gateway: Gateway) -> Account:  # noqa: F811 - the fixture, by name
    """A signed-in user of the session gateway with the default roles (no ``admin``)."""

    async def sign_in() -> Account:
        async with aiohttp.ClientSession() as session:
            return await signed_in(session, gateway.url, tag="attacker")

    return asyncio.run(sign_in())
