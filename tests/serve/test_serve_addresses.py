"""Address classification for image_url: unit tests that resolve and connect nowhere."""

from __future__ import annotations

import ipaddress

import pytest

from clipsearch.serve.addresses import embedded_ipv4, is_public

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    "v6,v4",
    [
        ("::ffff:10.1.2.3", ["10.1.2.3"]),  # IPv4-mapped
        ("::ffff:0:10.1.2.3", ["10.1.2.3"]),  # IPv4-translated (SIIT)
        ("::10.1.2.3", ["10.1.2.3"]),  # IPv4-compatible
        ("64:ff9b::10.1.2.3", ["10.1.2.3"]),  # NAT64 well-known prefix
        ("2002:0a01:0203::", ["10.1.2.3"]),  # 6to4
        ("2001:0:0a01:0203::", ["10.1.2.3", "255.255.255.255"]),  # Teredo: server, then client (~0)
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),  # RFC 4380's example
        ("::", []),
        ("::1", []),
        ("2606:4700::1111", []),
    ],
)
def test_embedded_ipv4(v6, v4):
    assert [str(a) for a in embedded_ipv4(ip(v6))] == v4


def test_nat64_local_use_prefix_checks_every_rfc6052_layout():
    # RFC 6052 section 2.2: 192.0.2.33 in each prefix length that fits in 64:ff9b:1::/48
    cases = {
        48: "64:ff9b:1:c000:2:2100::",
        56: "64:ff9b:1:00c0:0:221::",  # bits 56-63 then 72-95 (the u octet, bits 64-71, is skipped)
        64: "64:ff9b:1:0:c0:2:2100::",
        96: "64:ff9b:1::c000:221",
    }
    for n, addr in cases.items():
        assert ipaddress.ip_address("192.0.2.33") in embedded_ipv4(ip(addr)), n


@pytest.mark.parametrize(
    "addr",
    [
        # IPv4: loopback, private, link-local, shared, benchmarking, documentation, reserved, multicast
        "127.0.0.1",
        "10.0.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "198.18.0.1",
        "192.0.2.1",
        "192.0.0.1",
        "192.88.99.1",
        "240.0.0.1",
        "255.255.255.255",
        "224.0.0.1",
        "0.0.0.0",
        "0.1.2.3",
        # IPv6 itself
        "::1",
        "::",
        "fe80::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "3fff::1",
        "100::1",
        # IPv4 inside IPv6, every form
        "::ffff:127.0.0.1",
        "::ffff:0:127.0.0.1",
        "::127.0.0.1",
        "::169.254.169.254",
        "64:ff9b::127.0.0.1",
        "64:ff9b::10.0.0.1",
        "64:ff9b::169.254.169.254",
        "64:ff9b:1::127.0.0.1",
        "64:ff9b:1:7f00:0:100::",  # /48 layout of 127.0.0.1
        "64:ff9b:1:7f:0:1::",  # /56 layout of 127.0.0.1
        "64:ff9b:1:0:7f:0:100::",  # /64 layout of 127.0.0.1
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "2002:c0a8:101::1",
        "2001:0:7f00:1::",  # Teredo server 127.0.0.1
        "2001:0:808:808:0:0:f5ff:fffe",  # Teredo client ~0xf5fffffe = 10.0.0.1
    ],
)
def test_not_public(addr):
    assert not is_public(ip(addr))


@pytest.mark.parametrize(
    "addr",
    [
        "8.8.8.8",
        "93.184.216.34",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::8.8.8.8",  # NAT64 to a public address is as public as the address
        "2002:808:808::1",
    ],
)
def test_public(addr):
    assert is_public(ip(addr))


def test_zone_id_is_never_public():
    assert not is_public(ipaddress.IPv6Address("2606:4700::1%eth0"))
