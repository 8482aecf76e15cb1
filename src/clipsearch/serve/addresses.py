"""Which addresses `image_url` may reach: public unicast only, IPv4 inside IPv6 judged by the IPv4.

IPv6 has several forms that carry an IPv4 address, and a packet to one of them can end up at that IPv4
address (a NAT64 gateway, a 6to4 or Teredo relay, a dual-stack host's own IPv4-mapped socket). Each such
form is judged by every IPv4 address it may carry, as well as by itself:

- IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d` and IPv4-compatible `::a.b.c.d`;
- NAT64, RFC 6052: the well-known prefix `64:ff9b::/96` (the IPv4 in the last 32 bits) and the local-use
  prefix `64:ff9b:1::/48` (RFC 8215), whose operator picks the prefix length: the IPv4 of every RFC 6052
  layout that fits inside it (/48, /56, /64, /96) is checked;
- 6to4 `2002::/16` (the IPv4 in bits 16-47);
- Teredo `2001::/32` (the server's IPv4 in bits 32-63, the client's obfuscated in the last 32 bits).

Nothing here resolves or connects: it only classifies addresses.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
IP = IPv4 | IPv6

# ranges refused whatever this Python's `is_global` table says (it grows between Python versions)
_NOT_PUBLIC_V4 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local (cloud metadata services)
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
_NOT_PUBLIC_V6 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "::/128",
        "::1/128",
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_6TO4 = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def _v4(bits: int) -> IPv4:
    return IPv4(bits & 0xFFFFFFFF)


def _rfc6052(value: int, prefix_len: int) -> IPv4:
    """The IPv4 address inside an RFC 6052 IPv4-embedded IPv6 address with this prefix length.

    Bits 64-71 (the `u` octet) are never used, so the IPv4 is split around them for /40 to /56.
    """
    b = value.to_bytes(16, "big")
    if prefix_len == 96:
        v4 = b[12:16]
    elif prefix_len == 64:
        v4 = b[9:13]
    elif prefix_len == 56:
        v4 = b[7:8] + b[9:12]
    elif prefix_len == 48:
        v4 = b[6:8] + b[9:11]
    elif prefix_len == 40:
        v4 = b[5:8] + b[9:10]
    elif prefix_len == 32:
        v4 = b[4:8]
    else:  # pragma: no cover - only the lengths above exist
        raise ValueError(f"no RFC 6052 layout for /{prefix_len}")
    return IPv4(v4)


def embedded_ipv4(ip: IPv6) -> list[IPv4]:
    """Every IPv4 address that this IPv6 address may carry (empty for a plain IPv6 address)."""
    v = int(ip)
    if ip in _MAPPED or ip in _TRANSLATED:
        return [_v4(v)]
    if ip in _COMPATIBLE:
        return [] if v <= 1 else [_v4(v)]  # :: and ::1 are IPv6's own unspecified and loopback
    if ip in _NAT64_WKP:
        return [_v4(v)]
    if ip in _NAT64_LOCAL:
        return list(dict.fromkeys(_rfc6052(v, n) for n in (48, 56, 64, 96)))
    if ip in _6TO4:
        return [_v4(v >> 80)]
    if ip in _TEREDO:
        return [_v4(v >> 64), _v4(~v)]  # the server, then the client (stored XOR 0xffffffff)
    return []


@lru_cache(maxsize=4096)
def is_public(ip: IP) -> bool:
    """Whether `image_url` may connect to `ip`: a globally reachable unicast address, and for an IPv6
    address that embeds IPv4, every IPv4 it may carry is one too."""
    if isinstance(ip, IPv4):
        if any(ip in n for n in _NOT_PUBLIC_V4):
            return False
        return bool(ip.is_global) and not ip.is_multicast and not ip.is_unspecified
    if ip.scope_id:  # fe80::1%eth0 and the like
        return False
    inner = embedded_ipv4(ip)
    if inner:
        # the IPv4 decides; Python calls some of these prefixes global and others not (2001::/32, ::ffff:0:0/96)
        return all(is_public(a) for a in inner)
    if any(ip in n for n in _NOT_PUBLIC_V6):
        return False
    return bool(ip.is_global) and not ip.is_multicast and not ip.is_unspecified


def parse_ip(text: str) -> IP | None:
    """An address literal (IPv6 zone ids kept), or None when `text` is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
