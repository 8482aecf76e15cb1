import json

import pytest

from clipsearch import storage


def test_atomic_open_renames_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is cleaned up too
    storage.write_bytes_atomic(str(target), b"whole")
    assert target.read_bytes() == b"whole"


def test_json_round_trip_and_listing(tmp_path):
    storage.write_json_atomic(str(tmp_path / "b.json"), {"x": 1})
    storage.write_json_atomic(str(tmp_path / "a.json"), {"y": [1, 2]})
    (tmp_path / "c.txt").write_text("no")
    assert storage.read_json(str(tmp_path / "a.json")) == {"y": [1, 2]}
    assert [p.rsplit("/", 1)[1] for p in storage.listdir(str(tmp_path), ".json")] == ["a.json", "b.json"]
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}


def test_memory_filesystem_atomic_write_and_state():
    base = "memory://clipsearch-test-storage"
    assert storage.folder_state(base) == "missing"
    storage.makedirs(base)
    assert storage.folder_state(base) == "empty"
    storage.write_json_atomic(storage.join(base, "m.json"), {"ok": True})
    assert storage.read_json(base + "/m.json") == {"ok": True}
    assert storage.folder_state(base) == "nonempty"
    (listed,) = storage.listdir(base, ".json")
    assert listed.startswith("memory://") and listed.endswith("/m.json")
    assert storage.read_json(listed) == {"ok": True}
    assert not storage.is_local(base)
    assert storage.is_local("/tmp")
