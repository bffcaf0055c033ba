"""kdcore.archive: untrusted zips are refused before a member is read, with the member named."""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from kdcore.archive import ArchiveLimits, check_zip, open_zip, read_member, safe_member_path
from kdcore.errors import BadInputError


def make_zip(path: Path, members: Sequence[tuple[str | zipfile.ZipInfo, bytes]], *, deflate: bool = True) -> Path:
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def check(path: Path, limits: ArchiveLimits | None = None) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as zf:
        return check_zip(zf, limits)


def test_clean_zip_passes_and_lists_members(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "ok.zip", [("a/b.png", b"x" * 100), ("a/c.png", b"y" * 10)])
    infos = check(path)
    assert [i.filename for i in infos] == ["a/b.png", "a/c.png"]
    with zipfile.ZipFile(path) as zf:
        assert read_member(zf, infos[0]) == b"x" * 100


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.png", "'..'"),
        ("cats/../../evil.png", "'..'"),
        ("/abs.png", "absolute"),
        ("C:/windows/evil.png", "drive letter"),
        ("cats\\..\\..\\evil.png", "backslash"),
    ],
)
def test_path_tricks_are_refused_naming_the_member(tmp_path: Path, name: str, reason: str) -> None:
    path = make_zip(tmp_path / "slip.zip", [("cats/ok.png", b"ok"), (name, b"evil")])
    with pytest.raises(BadInputError) as exc:
        check(path)
    assert repr(name) in str(exc.value)
    assert reason in str(exc.value)


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("cats/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    link.create_system = 3  # unix
    path = make_zip(tmp_path / "link.zip", [("cats/ok.png", b"ok"), (link, b"/etc/passwd")])
    with pytest.raises(BadInputError, match=r"'cats/link.png' is a symbolic link"):
        check(path)


def test_device_file_member_is_refused(tmp_path: Path) -> None:
    fifo = zipfile.ZipInfo("cats/fifo.png")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    path = make_zip(tmp_path / "fifo.zip", [(fifo, b"")])
    with pytest.raises(BadInputError, match=r"'cats/fifo.png' is not a regular file"):
        check(path)


def test_too_many_members(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "many.zip", [(f"c/{i}.png", b"x") for i in range(5)])
    with pytest.raises(BadInputError, match=r"5 members, more than the limit of 3"):
        check(path, ArchiveLimits(max_members=3))
    assert len(check(path, ArchiveLimits(max_members=5))) == 5


def test_zip_bomb_member_is_refused(tmp_path: Path) -> None:
    # 50 MB of zeros deflates about 1000:1, far above the default limit of 200:1.
    path = make_zip(tmp_path / "bomb.zip", [("c/ok.png", b"ok"), ("c/bomb.png", bytes(50 * 1024 * 1024))])
    assert path.stat().st_size < 200_000
    with pytest.raises(BadInputError, match=r"'c/bomb.png' has compression ratio \d+:1.*zip bomb"):
        check(path)


def test_many_small_compressible_members_trip_the_overall_ratio(tmp_path: Path) -> None:
    # Each member is under ratio_min_bytes (16 MiB), so only the whole-archive ratio can catch them.
    members = [(f"c/{i}.bin", bytes(1024 * 1024)) for i in range(20)]
    path = make_zip(tmp_path / "spread.zip", members)
    with pytest.raises(BadInputError, match=r"overall compression ratio"):
        check(path)


def test_small_highly_compressible_members_are_fine(tmp_path: Path) -> None:
    # Labels sorted by class deflate about 700:1; small ones like these must not look like bombs.
    path = make_zip(tmp_path / "labels.zip", [("y_train.npy", bytes(2 * 1024 * 1024)), ("x.bin", os.urandom(10**6))])
    assert len(check(path)) == 2


def test_member_and_total_size_limits(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "big.zip", [("c/a.bin", b"a" * 1000), ("c/b.bin", b"b" * 1000)], deflate=False)
    with pytest.raises(BadInputError, match=r"'c/a.bin' unpacks to 1000 bytes, more than the limit of 999"):
        check(path, ArchiveLimits(max_member_bytes=999))
    with pytest.raises(BadInputError, match=r"more than 1500 bytes .*'c/b.bin'"):
        check(path, ArchiveLimits(max_total_bytes=1500))


def _set_encrypted_flag(path: Path) -> None:
    """zipfile cannot write encrypted members, so set the flag bit in the headers by hand."""
    data = bytearray(path.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        data[at + flag_offset] |= 0x1
    path.write_bytes(bytes(data))


def test_encrypted_member_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "enc.zip", [("c/secret.png", b"data")])
    _set_encrypted_flag(path)
    with pytest.raises(BadInputError, match=r"'c/secret.png' is encrypted"):
        check(path)


def test_duplicate_member_names_are_refused(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = make_zip(tmp_path / "dup.zip", [("x_train.npy", b"a"), ("x_train.npy", b"b")])
    with pytest.raises(BadInputError, match=r"'x_train.npy' appears more than once"):
        check(path)


def test_open_zip_refuses_non_zip(tmp_path: Path) -> None:
    path = tmp_path / "not.zip"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(BadInputError, match="not a zip archive"):
        open_zip(path, what="dataset")
    with pytest.raises(BadInputError, match="cannot read"):
        open_zip(tmp_path / "missing.zip")


def test_safe_member_path_stays_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert safe_member_path(root, "cats/a.png") == (root / "cats" / "a.png").resolve()
    for bad in ("../evil", "/etc/passwd", "a/../../evil", "a\\..\\evil"):
        with pytest.raises(BadInputError):
            safe_member_path(root, bad)


def test_safe_member_path_refuses_escape_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(BadInputError, match="outside the target folder"):
        safe_member_path(root, "link/evil.png")
