"""OpenAPI-driven fuzzing of every endpoint with schemathesis against a real server:
no 5xx, no traceback, and every error is problem+json with a code."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cloud.keys import KeyEncryptionKey  # noqa: F401  (the server uses the same KEK)
from cloud.store.registry import open_registry
from cloud_helpers import TEST_KEK, ServerProcess, add_user

_ = TEST_KEK


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "cloud.db"
    url = f"sqlite:///{path}"

    async def prepare() -> str:
        registry = await open_registry(url)
        try:
            return await add_user(registry, "fuzzer")
        finally:
            await registry.close()

    token = asyncio.run(prepare())
    process = ServerProcess(url, DOORSTEP_CLOUD_RATE_USER="1000000",
                            DOORSTEP_CLOUD_RATE_ADDRESS="1000000", DOORSTEP_CLOUD_RATE_DEVICE="1000000")
    process.start()
    yield process, token
    process.stop()


@pytest.fixture(scope="module")
def api_schema(server: tuple[ServerProcess, str]) -> schemathesis.BaseSchema:
    process, _token = server
    return schemathesis.openapi.from_url(process.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_endpoint_answers_5xx_or_leaks_a_traceback(
    case: schemathesis.Case, server: tuple[ServerProcess, str]
) -> None:
    _process, token = server
    for headers in ({"authorization": f"Bearer {token}"}, None):
        response = case.call(headers=headers, timeout=10)
        assert response.status_code < 500, response.text
        assert "Traceback" not in response.text
        if response.status_code >= 400:
            assert response.headers["content-type"][0].startswith("application/problem+json") \
                if isinstance(response.headers["content-type"], list) \
                else response.headers["content-type"].startswith("application/problem+json")
            assert "code" in response.json()
