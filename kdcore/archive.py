"""Safe reading of untrusted zip archives (npz files and ImageFolder zips). Torch-free.

Users upload these files, so every archive is checked before a single member is read:
member names that could escape a folder, links and special files, encryption, and sizes
that would exhaust memory or disk (zip bombs). Nothing here extracts to disk; readers take
members straight from the `ZipFile`, whose reads never return more than the size a member
declares, so the declared sizes checked here bound what is ever decompressed.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

from kdcore.errors import BadInputError

GiB = 1024**3
MiB = 1024**2

# Methods the standard library can decompress; anything else would fail later with a less clear error.
_SUPPORTED_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_DRIVE = re.compile(r"^[A-Za-z]:")
_ENCRYPTED_FLAG = 0x1


class ArchiveLimits(BaseModel):
    """Bounds on what an uploaded archive may unpack to; operators may raise or lower them."""

    model_config = ConfigDict(extra="forbid")

    max_members: int = Field(default=200_000, ge=1, description="Most entries (files and folders) in one zip.")
    max_total_bytes: int = Field(default=8 * GiB, ge=1, description="Most uncompressed bytes in one zip.")
    max_member_bytes: int = Field(default=256 * MiB, ge=1, description="Most uncompressed bytes in one member.")
    max_ratio: float = Field(
        default=200.0, gt=1.0, description="Highest compression ratio, per member and for the whole archive."
    )
    # Sorted label arrays deflate ~700:1 and are legitimate, so only sizes that could hurt are ratio-checked.
    ratio_min_bytes: int = Field(
        default=16 * MiB,
        ge=0,
        description="Members (and archives) unpacking to less than this skip the ratio check.",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Most pixels in one decoded image (image files compress too)."
    )
    max_decoded_bytes: int = Field(
        default=4 * GiB, ge=1, description="Most bytes a dataset's samples may take decoded (and resized) in memory."
    )
    max_central_directory_bytes: int = Field(
        default=64 * MiB, ge=22, description="Largest central directory, checked before it is parsed."
    )


DEFAULT_LIMITS = ArchiveLimits()


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_EOCD_SEARCH = _EOCD.size + 0xFFFF  # the record, then a comment of at most 64 KiB


def check_central_directory(path: str | Path, limits: ArchiveLimits, *, what: str = "file") -> None:
    """Refuse a zip whose end-of-central-directory record declares too many entries or too big a directory.

    `zipfile.ZipFile` reads and parses the whole central directory when it opens a file, so a
    300,000-entry zip would cost hundreds of megabytes before `check_zip` could count them; the
    record at the end of the file says both numbers in a few bytes. A file without the record is
    left to `zipfile` to refuse.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            start = max(0, size - _EOCD_SEARCH)
            handle.seek(start)
            tail = handle.read()
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or at + _EOCD.size > len(tail):
                return
            _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
            locator_at = at - _ZIP64_LOCATOR.size
            if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and locator_at >= 0:
                signature, _, record_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, locator_at)
                if signature == b"PK\x06\x07" and record_offset + _ZIP64_EOCD.size <= size:
                    handle.seek(record_offset)
                    record = handle.read(_ZIP64_EOCD.size)
                    if record[:4] == b"PK\x06\x06":
                        _, _, _, _, _, _, _, entries, cd_size, _ = _ZIP64_EOCD.unpack(record)
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc.strerror or exc}") from None
    if entries > limits.max_members:
        raise BadInputError(f"{what} is a zip of {entries} members, more than the limit of {limits.max_members}")
    if cd_size > limits.max_central_directory_bytes:
        raise BadInputError(
            f"{what} has a zip directory of {cd_size} bytes, more than the limit of "
            f"{limits.max_central_directory_bytes}"
        )


def open_zip(path: str | Path, *, what: str = "file", limits: ArchiveLimits | None = None) -> zipfile.ZipFile:
    """Open `path` as a zip, turning "not a zip" into a BadInputError the user can act on.

    The directory's declared size is checked first (`check_central_directory`).
    """
    check_central_directory(path, limits or DEFAULT_LIMITS, what=what)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise BadInputError(f"{what} is not a zip archive (.npz or .zip): {exc}") from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc.strerror or exc}") from None


def check_name(name: str) -> PurePosixPath:
    """Refuse member names that could point outside the folder they would be unpacked into."""
    if not name:
        raise BadInputError("archive member has an empty name")
    if "\\" in name:
        # zip names use "/", a backslash is a Windows separator that can smuggle in "..\\".
        raise BadInputError(f"archive member {name!r} has a backslash in its name")
    if name.startswith("/"):
        raise BadInputError(f"archive member {name!r} has an absolute path")
    if _DRIVE.match(name):
        raise BadInputError(f"archive member {name!r} names a drive letter")
    if "\x00" in name:
        raise BadInputError(f"archive member {name!r} has a NUL character in its name")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise BadInputError(f"archive member {name!r} has a '..' component (path traversal)")
    return path


def _check_file_type(info: zipfile.ZipInfo) -> None:
    # Unix zips keep st_mode in the high 16 bits; 0 there means "not recorded" (DOS zips).
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise BadInputError(f"archive member {info.filename!r} is a symbolic link")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise BadInputError(f"archive member {info.filename!r} is not a regular file (mode {oct(mode)})")


def _check_member(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    check_name(info.filename)
    _check_file_type(info)
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise BadInputError(f"archive member {info.filename!r} is encrypted")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise BadInputError(
            f"archive member {info.filename!r} uses compression method {info.compress_type}; "
            f"supported: {', '.join(_SUPPORTED_METHODS.values())}"
        )
    if info.file_size > limits.max_member_bytes:
        raise BadInputError(
            f"archive member {info.filename!r} unpacks to {info.file_size} bytes, "
            f"more than the limit of {limits.max_member_bytes}"
        )
    if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        raise BadInputError(
            f"archive member {info.filename!r} has compression ratio {ratio:.0f}:1, "
            f"above the limit of {limits.max_ratio:.0f}:1 (zip bomb?)"
        )


def check_zip(zf: zipfile.ZipFile, limits: ArchiveLimits | None = None) -> list[zipfile.ZipInfo]:
    """Check every member of an untrusted zip; return the members, or raise BadInputError naming the culprit.

    Directory entries are returned too (callers skip them with `info.is_dir()`).
    """
    limits = limits or DEFAULT_LIMITS
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise BadInputError(f"archive has {len(infos)} members, more than the limit of {limits.max_members}")
    seen: set[str] = set()
    total = compressed = 0
    for info in infos:
        _check_member(info, limits)
        if info.filename in seen:
            # Two members of one name: a check could read one and a loader the other.
            raise BadInputError(f"archive member {info.filename!r} appears more than once")
        seen.add(info.filename)
        total += info.file_size
        compressed += info.compress_size
        if total > limits.max_total_bytes:
            raise BadInputError(
                f"archive unpacks to more than {limits.max_total_bytes} bytes (limit reached at member "
                f"{info.filename!r})"
            )
    if total >= limits.ratio_min_bytes and total > limits.max_ratio * max(compressed, 1):
        raise BadInputError(
            f"archive has overall compression ratio {total / max(compressed, 1):.0f}:1, "
            f"above the limit of {limits.max_ratio:.0f}:1 (zip bomb?)"
        )
    return infos


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """Read one checked member into memory; corrupt data becomes a BadInputError naming it."""
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise BadInputError(f"archive member {info.filename!r} cannot be read: {exc}") from None


def safe_member_path(root: Path, name: str) -> Path:
    """Where member `name` would live under `root`, refusing any name that resolves outside it."""
    check_name(name)
    base = root.resolve()
    target = (base / name).resolve()  # follows symlinks already on disk, which could point elsewhere
    if not target.is_relative_to(base):
        raise BadInputError(f"archive member {name!r} would land outside the target folder")
    return target
