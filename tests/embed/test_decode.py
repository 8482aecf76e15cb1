from __future__ import annotations

import os
from dataclasses import dataclass

from clipsearch.embed.preprocess import ImagePreprocessor, decode_batch
from clipsearch.embed.runner import DecodePool

from .conftest import CORRUPT, image_bytes


@dataclass(frozen=True)
class CrashingPreprocessor(ImagePreprocessor):
    """Kills its worker process on b"CRASH", like a decoder segfault would."""

    def bytes_to_array(self, data: bytes):
        if data == b"CRASH":
            os._exit(1)
        return super().bytes_to_array(data)


def test_decode_batch_reports_bad_images() -> None:
    pp = ImagePreprocessor(size=(32, 32), crop=(32, 32))
    arr, ok, bad = decode_batch(pp, [image_bytes(1), CORRUPT, None, image_bytes(2, "PNG", (300, 20))])
    assert arr.shape == (2, 32, 32, 3) and ok == [0, 3]
    assert [i for i, _ in bad] == [1, 2]


def test_jpeg_draft_decodes_big_images_at_reduced_scale() -> None:
    pp = ImagePreprocessor(size=(32, 32), crop=(32, 32))
    img = pp.decode(image_bytes(3, "JPEG", (400, 300)))
    assert img.size == (100, 75)  # 1/4 scale: the largest reduction that stays >= 1.5x the 42x32 resize
    assert pp.to_array(img).shape == (32, 32, 3)
    assert pp.decode(image_bytes(3, "JPEG", (100, 100))).size == (50, 50)  # 1/2: still >= 1.5x 32
    assert pp.decode(image_bytes(3, "JPEG", (90, 90))).size == (90, 90)  # under 3x the target: full decode


def test_pool_survives_a_crashing_decoder() -> None:
    pp = CrashingPreprocessor(size=(32, 32), crop=(32, 32))
    pool = DecodePool(1)
    try:
        bad_batch = [image_bytes(1), b"CRASH", image_bytes(2)]
        arr, ok, bad = pool.decode(pp, bad_batch, pool.submit(pp, bad_batch))
        assert ok == [] and len(bad) == 3 and bad[0][1] == "decoder crashed"
        good = [image_bytes(3), image_bytes(4)]
        arr, ok, bad = pool.decode(pp, good, pool.submit(pp, good))
        assert ok == [0, 1] and arr.shape == (2, 32, 32, 3)
    finally:
        pool.shutdown()


def test_precision_tuner_keeps_bf16_only_when_faster(monkeypatch) -> None:
    import types

    from clipsearch.embed import runner

    clock = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    for bf16_speedup, want in ((2.0, "bf16"), (1.05, "fp32")):
        enc = types.SimpleNamespace(precision="fp32", precision_probe={}, tune_precision=True)
        tuner = runner.PrecisionTuner(enc)
        used = []
        while tuner.active:
            t0 = tuner.start()
            used.append(enc.precision)
            clock[0] += 1.0 / bf16_speedup if enc.precision == "bf16" else 1.0
            tuner.stop(t0, 10)
        assert used == ["fp32", "bf16", "bf16", "fp32"]
        assert (
            enc.precision == want and not enc.tune_precision and set(enc.precision_probe) == {"fp32", "bf16"}
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_close_decode_pool_stops_the_kept_workers() -> None:
    """The demo builds, then serves from the same process: the decode workers kept for a next embed run
    are stopped, and the next run gets a fresh pool."""
    from clipsearch.embed import runner

    pool = runner._decode_pool(1)
    assert runner._decode_pool(1) is pool  # kept between runs of one process
    pp = ImagePreprocessor(size=(32, 32), crop=(32, 32))
    pool.decode(pp, [image_bytes(1)], pool.submit(pp, [image_bytes(1)]))
    pids = [p.pid for p in pool._ex._processes.values()]  # the executor's worker processes
    assert pids and all(_alive(p) for p in pids)
    runner.close_decode_pool()
    assert not any(_alive(p) for p in pids)  # shutdown waited for them
    fresh = runner._decode_pool(1)
    try:
        assert fresh is not pool
    finally:
        runner.close_decode_pool()
