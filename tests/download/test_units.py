"""Small pure functions of the download stage: opt-out parsing, Retry-After, keys, tfrecord encoding."""

from __future__ import annotations

import io
import struct

import pytest

from clipsearch.download import writers
from clipsearch.download.config import DownloadConfig
from clipsearch.download.fetch import parse_retry_after, robots_opt_out
from clipsearch.download.runner import shard_key
from clipsearch.errors import ConfigError

D = ("noai", "noimageai", "noindex", "noimageindex")
US = frozenset({"clipsearch"})


@pytest.mark.parametrize(
    "values,expected",
    [
        ([], None),
        (["nofollow"], None),
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["nofollow, noindex"], "noindex"),
        (["otherbot: noai"], None),
        (["clipsearch: noimageai"], "clipsearch: noimageai"),
        (["otherbot: noai", "nofollow"], None),
        (["otherbot: nofollow", "clipsearch: noai"], "clipsearch: noai"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["max-image-preview: large, noai"], "noai"),
    ],
)
def test_robots_opt_out(values, expected):
    assert robots_opt_out(values, US, D) == expected


def test_robots_custom_token_and_disabled():
    assert robots_opt_out(["mybot: noai"], frozenset({"clipsearch", "mybot"}), D) == "mybot: noai"
    assert robots_opt_out(["noai"], US, ()) is None


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def test_keys():
    assert shard_key(3, 7, 10000) == "000030007"
    assert shard_key(3, 7, 100000) == "0000300007"
    assert shard_key(123456, 0, 10) == "1234560000"


@pytest.mark.parametrize(
    "kw,hint",
    [
        ({"resize_mode": "stretch"}, "--resize-mode"),
        ({"output_format": "zip"}, "--output-format"),
        ({"image_size": 0}, "--image-size"),
        ({"encode_format": "png", "encode_quality": 50}, "--encode-quality"),
        ({"timeout": 0}, "--timeout"),
        ({"thread_count": 0}, "--thread-count"),
        ({"compute_hash": "crc"}, "--compute-hash"),
        ({"dedup": True, "compute_hash": "none"}, "--compute-hash"),
        ({"user_agent_token": "bad token/1"}, "--user-agent-token"),
        ({"save_additional_columns": ("status",)}, "--save-additional-columns"),
    ],
)
def test_config_validation(kw, hint):
    with pytest.raises(ConfigError) as e:
        DownloadConfig(url_list="u.txt", output_folder="o", **kw)
    assert e.value.hint.startswith(hint)


def test_user_agent_is_honest_and_configurable():
    cfg = DownloadConfig(url_list="u.txt", output_folder="o", user_agent_token="mybot")
    assert cfg.user_agent.startswith("clipsearch/") and "mybot" in cfg.user_agent
    assert cfg.agent_tokens == {"clipsearch", "mybot"}


def read_tfrecords(data: bytes) -> list[bytes]:
    """A reference TFRecord reader that checks both CRCs."""
    out, f = [], io.BytesIO(data)
    while head := f.read(12):
        (n,) = struct.unpack("<Q", head[:8])
        assert struct.unpack("<I", head[8:])[0] == writers.masked_crc(head[:8])
        rec = f.read(n)
        assert struct.unpack("<I", f.read(4))[0] == writers.masked_crc(rec)
        out.append(rec)
    return out


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = val = 0
    while True:
        c = b[i]
        i += 1
        val |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return val, i


def _fields(b: bytes) -> list[tuple[int, bytes]]:
    i, out = 0, []
    while i < len(b):
        tag, i = _varint(b, i)
        assert tag & 7 == 2
        n, i = _varint(b, i)
        out.append((tag >> 3, b[i : i + n]))
        i += n
    return out


def parse_example(rec: bytes) -> dict:
    """Decode the tf.train.Example subset we write: {name: bytes | int | float}."""
    ((num, features),) = _fields(rec)
    assert num == 1
    out = {}
    for _, entry in _fields(features):
        kv = dict(_fields(entry))
        name = kv[1].decode()
        ((kind, lst),) = _fields(kv[2])
        ((_, payload),) = _fields(lst)
        if kind == 1:
            out[name] = payload
        elif kind == 3:
            v, _ = _varint(payload, 0)
            out[name] = v - (1 << 64) if v >= 1 << 63 else v
        else:
            out[name] = struct.unpack("<f", payload)[0]
    return out


def test_crc32c_known_value():
    assert writers._crc32c_py(b"123456789") == 0xE3069283
    assert writers.crc32c(b"123456789") == 0xE3069283


def test_tfrecord_example_roundtrip():
    buf = io.BytesIO()
    writers.write_tfrecord(
        buf, writers.encode_example({"jpg": b"\xff\xd8data", "txt": "hé", "width": 256, "neg": -3, "f": 0.5})
    )
    (rec,) = read_tfrecords(buf.getvalue())
    assert parse_example(rec) == {
        "jpg": b"\xff\xd8data",
        "txt": "hé".encode(),
        "width": 256,
        "neg": -3,
        "f": 0.5,
    }


def test_in_order_release_spills_past_its_memory_cap():
    got = []
    order = writers._InOrder(lambda k, d: got.append((k, d)), cap=10)
    order.expect(["a", "b", "c", "d", "e"])
    order.put("c", b"cccccc")
    order.put("e", b"eeeeee")  # over the cap: the last to be released goes to the spool file
    assert order._spool is not None and "e" in order._spool and got == []
    order.put("b", None)  # a failed row: nothing to store, but its turn passes
    order.put("a", b"a")
    assert got == [("a", b"a"), ("c", b"cccccc")]
    order.put("d", b"d")
    assert got[-2:] == [("d", b"d"), ("e", b"eeeeee")]
    order.finish()
    assert order._spool is None
