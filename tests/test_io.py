"""attnlab.io.atomic_write: what it writes, where its temp file lives, and what a failed write leaves behind."""
import os

import pytest

from attnlab.io import TMP_NAME, AtomicWriteError, atomic_write


def test_bytes_str_and_callable_and_a_new_folder(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(str(tmp_path / "sub" / "b.txt"), "héllo\n")  # str is UTF-8; the folder is created
    atomic_write(tmp_path / "c.bin", lambda f: f.write(b"streamed"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "c.bin").read_bytes() == b"streamed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.bin", "sub"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("bad data")])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, error):
    target = tmp_path / "results.json"
    atomic_write(target, "old")
    seen = []

    def half_then_fail(f):
        f.write(b"ne")
        seen.append(os.path.basename(f.name))
        raise error
    # an OSError becomes an AtomicWriteError naming the path; anything else passes through as it was
    with pytest.raises(AtomicWriteError if isinstance(error, OSError) else ValueError,
                       match=str(target) if isinstance(error, OSError) else "bad data"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    m = TMP_NAME.match(seen[0])  # the temp file was beside the target, named <name>.<pid>.tmp
    assert m and m["target"] == "results.json" and int(m["pid"]) == os.getpid()
