"""Fuzz the OpenAPI spec with schemathesis against the ASGI app: no request may produce a 5xx.

Bounded and deterministic: a fixed number of examples per operation, derandomised, no example database.
Both valid (positive) and schema-violating (negative) requests are generated.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder, build_index

EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz") / "index")
    enc = FakeEncoder(32)
    build_index(folder, n=300, encoder=enc)
    app = create_app(
        ServeConfig(indices={"fuzz": folder}, url_timeout_s=0.3, url_max_redirects=1), encoder=enc
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema):
    return [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_schema, mode):
    ops = _operations(fuzz_schema)
    assert {op.label for op in ops} >= {
        "POST /knn",
        "POST /metadata",
        "GET /indices",
        "GET /healthz",
        "GET /metrics",
    }
    failures: list[str] = []
    for op in ops:
        try:
            strategy = op.as_strategy(generation_mode=mode)
        except Exception as e:  # an operation with nothing to generate in this mode
            if mode == GenerationMode.NEGATIVE:
                continue
            raise AssertionError(f"{op.label}: {e}") from e

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.200} -> {response.status_code}: {response.text[:200]}"
                )

        try:
            run()
        except Unsatisfiable:
            if mode != GenerationMode.NEGATIVE:
                raise  # an operation without inputs has no invalid requests to generate
    assert not failures, "\n".join(failures[:10])
