"""`atomic.replacing`: the new file appears whole under its name, or the old one stays untouched."""
import pytest

from fastssl import atomic


def test_replacing_writes_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    with atomic.replacing(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"new")
        assert not path.exists()  # nothing under the real name until the block ends
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_replacing_keeps_the_old_file_on_error(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with atomic.replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_text_replaces(tmp_path):
    path = atomic.write_text(tmp_path / "a.json", "1")
    atomic.write_text(path, "2")
    assert path.read_text() == "2" and len(list(tmp_path.iterdir())) == 1
