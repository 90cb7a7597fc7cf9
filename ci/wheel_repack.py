"""Re-pack a wheel smaller for the GPU bundle: leave out files the GPU check never loads, and
compress every member with LZMA instead of deflate.

A wheel is a zip file and pip reads it with Python's `zipfile`, which reads LZMA members
(zip method 14) like deflated ones, so `pip install` takes the re-packed wheel as it is; the
shared libraries that make up most of the bundle shrink by about a quarter more than with
deflate. Files left out are also taken out of the wheel's RECORD, so the installed RECORD
lists what is really there. Other installers than pip may not read LZMA members.
"""

from __future__ import annotations

import fnmatch
import zipfile
from pathlib import Path


def _record_without(record: str, dropped: set[str]) -> str:
    """RECORD's lines less those of the dropped files (its paths are the wheel's member names)."""
    kept = [line for line in record.splitlines() if line.split(",", 1)[0] not in dropped]
    return "\n".join(kept) + "\n"


def repack(source: Path, target: Path, drop: tuple[str, ...] = ()) -> list[str]:
    """Write `source` to `target` LZMA-compressed, without the members matching a glob of `drop`.

    Returns the names left out. A glob that matches nothing raises: a new release that moved
    the files must be looked at, not silently shipped whole (or broken).
    """
    with zipfile.ZipFile(source) as wheel:
        names = wheel.namelist()
        dropped = {name for name in names if any(fnmatch.fnmatchcase(name, glob) for glob in drop)}
        unmatched = [glob for glob in drop if not any(fnmatch.fnmatchcase(name, glob) for name in names)]
        if unmatched:
            raise ValueError(f"{source.name}: nothing matches {unmatched}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_LZMA) as out:
            for info in wheel.infolist():
                if info.filename in dropped:
                    continue
                data = wheel.read(info)
                if dropped and info.filename.endswith(".dist-info/RECORD"):
                    data = _record_without(data.decode(), dropped).encode()
                member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                member.external_attr = info.external_attr  # keeps the executable bits of scripts
                member.compress_type = zipfile.ZIP_LZMA
                out.writestr(member, data)
        partial.replace(target)
    return sorted(dropped)
