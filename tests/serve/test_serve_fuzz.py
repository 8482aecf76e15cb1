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


# ------------------------------------------------------------------ hostile inputs the spec's types allow
# Strategies for the fields where the security review found 500s: deeply nested filters, form fields holding
# deeply nested JSON, and URLs with malformed IDNA hosts or IPv6 forms that carry a private IPv4 address.
# They are fed to POST /knn as JSON, multipart and urlencoded bodies. No case may reach the network: names
# never go to DNS (the resolver below answers for IP literals and localhost only) and any attempt to
# connect fails the test.
_REFUSED_V4 = [
    "127.0.0.1",
    "10.1.2.3",
    "169.254.169.254",
    "192.168.0.1",
    "100.64.0.1",
    "0.0.0.0",
    "172.16.0.1",
]


def _v6_forms(v4: str) -> list[str]:
    import ipaddress

    n = int(ipaddress.IPv4Address(v4))
    return [
        f"::ffff:{v4}",
        f"::{v4}",
        f"64:ff9b::{v4}",
        str(ipaddress.IPv6Address((0x0064FF9B0001 << 80) | n)),  # local-use NAT64 prefix, /96 layout
        str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80))),  # 6to4
        str(ipaddress.IPv6Address((0x20010000 << 96) | (n << 64))),  # Teredo server
    ]


def _hostile_strategies():
    import json

    from hypothesis import strategies as st

    hosts = [f"[{a}]" for v4 in _REFUSED_V4 for a in _v6_forms(v4)] + _REFUSED_V4 + ["localhost", "[::1]"]
    urls = st.one_of(
        st.sampled_from(
            [
                "http://xn--localhost-/",
                "http://xn--/a.png",
                "http://xn--a.xn--b/",
                "http://a.example:99999/",
                "http://[::1",
                "http://[64:ff9b::7f00:1]:0/",
                "ftp://127.0.0.1/",
                "http://%00/",
                "http:///x",
            ]
        ),
        st.builds(
            lambda h, p: f"http://{h}{p}/a.png", st.sampled_from(hosts), st.sampled_from(["", ":80", ":8443"])
        ),
        st.from_regex(r"https?://xn--[a-z0-9-]{0,12}(\.xn--[a-z0-9-]{0,6})?/", fullmatch=True),
        st.text(max_size=60),
    )
    filters = st.one_of(
        st.integers(0, 700).map(lambda n: "(" * n + "width == 1" + ")" * n),
        st.integers(0, 600).map(lambda n: "not " * n + "width >= 1"),
        st.integers(0, 120).map(lambda n: " or ".join(f'caption contains "w{i}"' for i in range(max(1, n)))),
        st.integers(-(10**30), 10**30).map(lambda v: f"width == {v}"),
        st.text(max_size=80),
    )
    arrays = st.one_of(
        st.integers(0, 12_000).map(lambda n: "[" * n + "]" * n),
        st.integers(0, 3000).map(lambda n: "[" * n + "1" + "]" * n),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=40).map(json.dumps),
        st.text(max_size=80),
    )
    return urls, filters, arrays


def _patched_spec(app):
    import copy

    spec = copy.deepcopy(app.openapi())
    body = spec["paths"]["/knn"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    hostile = {"filter": "hostile-filter", "image_url": "hostile-url", "embedding": "hostile-json-array"}
    forms = [
        body[m]["schema"]["properties"] for m in ("multipart/form-data", "application/x-www-form-urlencoded")
    ]
    for props in forms:
        for name, fmt in hostile.items():
            props[name] = {"type": "string", "format": fmt}
    json_props = spec["components"]["schemas"]["KnnRequest"]["properties"]
    for name in ("filter", "image_url"):
        json_props[name] = {"type": "string", "format": hostile[name]}
    # fields without a hostile family (fuzzed by test_no_server_errors) would thin out the examples here
    quiet = ("multilingual", "aesthetic_score", "aesthetic_weight", "violence", "violence_threshold")
    for props in (*forms, json_props):
        for name in quiet:
            props.pop(name, None)
    return spec


def test_hostile_inputs_never_5xx(tmp_path, monkeypatch):
    import ipaddress

    import httpx

    import clipsearch.serve.fetch_image as fi
    from clipsearch.serve.fetch_image import ImageFetchError

    folder = str(tmp_path / "index")
    enc = FakeEncoder(32)
    build_index(folder, n=300, encoder=enc)
    app = create_app(ServeConfig(indices={"fuzz": folder}, url_timeout_s=0.3), encoder=enc)

    async def no_dns(host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            if host == "localhost":
                return ["127.0.0.1"]
            raise ImageFetchError(fi.REFUSED, 403) from None  # as a name that does not resolve

    connects: list[str] = []

    async def no_connect(self, request, **kw):
        connects.append(str(request.url))
        raise httpx.ConnectError("the fuzz test connects nowhere")

    monkeypatch.setattr(fi, "_resolve", no_dns)
    monkeypatch.setattr(httpx.AsyncClient, "send", no_connect)
    urls, filters, arrays = _hostile_strategies()
    schemathesis.openapi.format("hostile-url", urls)
    schemathesis.openapi.format("hostile-filter", filters)
    schemathesis.openapi.format("hostile-json-array", arrays)
    schema = schemathesis.openapi.from_dict(_patched_spec(app))
    schema.app = app
    op = schema["/knn"]["POST"]
    failures: list[str] = []
    reached = {"application/json": 0, "multipart/form-data": 0, "application/x-www-form-urlencoded": 0}
    deep = {"filter": 0, "embedding": 0, "idna": 0, "v6": 0}

    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        body = case.body if isinstance(case.body, dict) else {}
        reached[case.media_type] = reached.get(case.media_type, 0) + 1
        deep["filter"] += (
            str(body.get("filter", "")).count("(") > 32 or str(body.get("filter", "")).count("not") > 32
        )
        deep["embedding"] += str(body.get("embedding", "")).count("[") > 1000
        deep["idna"] += "xn--" in str(body.get("image_url", ""))
        deep["v6"] += "[" in str(body.get("image_url", "")) and ":" in str(body.get("image_url", ""))
        response = case.call()
        if response.status_code >= 500:
            failures.append(
                f"{case.media_type} {str(body)[:300]} -> {response.status_code}: {response.text[:200]}"
            )

    run()
    assert not failures, "\n".join(failures[:10])
    assert not connects, connects[:5]
    assert all(n > 0 for n in reached.values()), reached  # every body form was fuzzed
    assert all(n > 0 for n in deep.values()), deep  # and every hostile family was reached
