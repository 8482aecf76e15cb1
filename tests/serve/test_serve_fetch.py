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
        url_timeout_s=1.0,
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
    assert "refused" in r.json()["detail"] and "--allow-url-host" in r.json()["detail"]


def test_redirect_to_private_address_refused(open_client, image_server):
    r = open_client.post("/knn", json={"image_url": image_server + "/to-private"})
    assert r.status_code == 403 and "127.0.0.2" in r.json()["detail"]


@pytest.mark.parametrize(
    "path,status,fragment",
    [
        ("/big.png", 413, "limit"),
        ("/slow.png", 408, "longer than"),
        ("/notimage.png", 400, "could not be decoded"),
        ("/missing.png", 422, "HTTP 404"),
        ("/loop", 422, "redirected more than"),
    ],
)
def test_fetch_failures_are_4xx(open_client, image_server, path, status, fragment):
    r = open_client.post("/knn", json={"image_url": image_server + path})
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


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
    with pytest.raises(ImageFetchError, match="10.0.0.7"):
        asyncio.run(check_url(httpx.URL("http://rebind.example/a.png"), ()))
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
