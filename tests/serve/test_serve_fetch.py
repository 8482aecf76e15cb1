"""image_url fetching: private addresses refused (also after redirects) unless allow-listed; size and time caps."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from clipsearch.serve import ServeConfig, create_app
from clipsearch.serve.fetch_image import ImageFetchError, check_url, fetch_image_bytes


@pytest.fixture(scope="module")
def open_client(index_dir, encoder):
    settings = ServeConfig(
        indices={"shapes": index_dir},
        allow_url_hosts=("127.0.0.1",),
        url_timeout_s=5.0,  # local answers meet it at any load; /slow.png takes 20 s
        max_image_bytes=1024 * 1024,
    )
    with TestClient(create_app(settings, encoder=encoder)) as c:
        yield c


@pytest.fixture(scope="module")
def strict_client(index_dir, encoder):
    with TestClient(create_app(ServeConfig(indices={"shapes": index_dir}), encoder=encoder)) as c:
        yield c


def test_allow_listed_loopback_image_url_works(open_client, image_server):
    r = open_client.post("/knn", json={"image_url": image_server + "/red.png", "k": 3})
    assert r.status_code == 200, r.text
    assert all("red" in h["caption"] for h in r.json()["results"])
    assert "fetch" in r.json()["timings_ms"]
    r = open_client.post(
        "/knn", json={"image_url": image_server + "/to-red", "k": 3}
    )  # a redirect to the same host
    assert r.status_code == 200, r.text


def test_loopback_refused_without_allow_list(strict_client, image_server):
    r = strict_client.post("/knn", json={"image_url": image_server + "/red.png"})
    assert r.status_code == 403
    assert "this host is not allowed" in r.json()["detail"] and "--allow-url-host" in r.json()["detail"]
    assert "127.0.0.1" not in r.json()["detail"]


def test_redirect_to_private_address_refused(open_client, image_server):
    r = open_client.post("/knn", json={"image_url": image_server + "/to-private"})
    assert r.status_code == 403 and "not allowed" in r.json()["detail"]
    assert "127.0.0.2" not in r.json()["detail"]  # the refused address is logged, not returned


def test_unresolvable_and_private_names_get_the_same_answer(strict_client, caplog):
    """A name that does not resolve and one that resolves to a private address are indistinguishable."""
    caplog.set_level("INFO", logger="clipsearch.serve.fetch_image")
    a = strict_client.post("/knn", json={"image_url": "http://localhost/a.png"})
    b = strict_client.post("/knn", json={"image_url": "http://no-such-host.invalid/a.png"})
    assert a.status_code == b.status_code == 403
    assert a.json() == b.json()
    body = a.text + b.text
    for leak in ("127.0.0.1", "::1", "resolve", "Errno", "gaierror", "Name or service"):
        assert leak not in body
    assert "127.0.0.1" in caplog.text or "::1" in caplog.text  # the details stay in the server log


@pytest.mark.parametrize(
    "path,status,fragment",
    [
        ("/big.png", 413, "limit"),
        ("/slow.png", 408, "longer than"),
        ("/notimage.png", 400, "could not be decoded"),
        ("/to-idna", 400, "invalid URL"),
        ("/to-bad-port", 400, "invalid port"),
        ("/missing.png", 422, "HTTP 404"),
        ("/loop", 422, "redirected more than"),
    ],
)
def test_fetch_failures_are_4xx(open_client, image_server, path, status, fragment):
    r = open_client.post("/knn", json={"image_url": image_server + path})
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert "Error" not in r.json()["detail"]  # no library class names


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("http://xn--localhost-/", "invalid host name"),
        ("http://xn--/a.png", "invalid host name"),
        ("http://a.example:99999/a.png", "invalid port"),
        ("http://[::1/a.png", "not a valid URL"),
        ("http://a\x00b/", "not a valid URL"),
        ("ftp://example.com/a.png", "http or https"),
        ("http:///a.png", "no host"),
        ("//example.com/a.png", "http or https"),
    ],
)
def test_malformed_urls_are_400(strict_client, url, fragment):
    r = strict_client.post("/knn", json={"image_url": url.replace("\\x00", "\x00")})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]
    assert "IDNA" not in r.text and "Error" not in r.text


def test_connection_failure_names_no_library_class(open_client):
    port = _closed_port()
    r = open_client.post("/knn", json={"image_url": f"http://127.0.0.1:{port}/a.png"})
    assert (
        r.status_code == 422 and r.json()["detail"] == "image_url could not be fetched: the connection failed"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/a.png",
        "http://192.168.0.1/a.png",
        "http://172.16.5.4/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.png",
        "http://[fe80::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://0.0.0.0/a.png",
        "http://100.64.0.1/a.png",
        "http://localhost/a.png",
        # IPv6 forms that carry an IPv4 address are judged by that address
        "http://[64:ff9b::7f00:1]/a.png",  # NAT64 well-known prefix -> 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/a.png",  # -> 169.254.169.254
        "http://[64:ff9b:1:7f00:0:100::]/a.png",  # NAT64 local-use prefix, /48 layout -> 127.0.0.1
        "http://[64:ff9b:1::a00:1]/a.png",  # local-use prefix, /96 layout -> 10.0.0.1
        "http://[2002:7f00:1::]/a.png",  # 6to4 -> 127.0.0.1
        "http://[2002:a00:1::1]/a.png",  # 6to4 -> 10.0.0.1
        "http://[2001:0:7f00:1::808:808]/a.png",  # Teredo, server 127.0.0.1
        "http://[::127.0.0.1]/a.png",  # IPv4-compatible
        "http://[::ffff:0:a00:1]/a.png",  # IPv4-translated -> 10.0.0.1
        "http://[::ffff:169.254.169.254]/a.png",  # IPv4-mapped
        "http://[fd00::1]/a.png",  # unique local
        "http://[fe80::1%25eth0]/a.png",  # link-local with a zone
        "http://[::]/a.png",
        "http://[ff02::1]/a.png",
    ],
)
def test_private_link_local_and_loopback_addresses_refused(url):
    with pytest.raises(ImageFetchError) as e:
        asyncio.run(check_url(httpx.URL(url), ()))
    assert e.value.status == 403


def test_hostname_resolving_to_private_refused(monkeypatch):
    import clipsearch.serve.fetch_image as fi

    async def fake_resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one public, one private: refused

    monkeypatch.setattr(fi, "_resolve", fake_resolve)
    with pytest.raises(ImageFetchError, match="not allowed") as e:
        asyncio.run(check_url(httpx.URL("http://rebind.example/a.png"), ()))
    assert e.value.status == 403 and "10.0.0.7" not in e.value.one_line()
    assert (
        asyncio.run(check_url(httpx.URL("http://rebind.example/a.png"), ("rebind.example",)))
        == "93.184.216.34"
    )


def test_connection_goes_to_the_checked_address(monkeypatch):
    """The request is sent to the resolved, checked IP with the original Host header (no second lookup)."""
    import clipsearch.serve.fetch_image as fi

    async def fake_resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"img")

    monkeypatch.setattr(fi, "_resolve", fake_resolve)
    data = asyncio.run(fetch_image_bytes("http://pics.example/a.png", transport=httpx.MockTransport(handler)))
    assert data == b"img"
    assert seen[0].url.host == "93.184.216.34" and seen[0].headers["host"] == "pics.example"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
