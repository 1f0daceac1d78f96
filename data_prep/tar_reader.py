"""The one reader of webdataset tars: members grouped into samples by key, read into memory, never extracted.

A sample is the run of consecutive regular members sharing a key: the member name up to the first dot of its base
name (``dir/000123.jpg`` -> key ``dir/000123``, extension ``jpg``, lower-cased). Names without an extension are
ignored. Every consumer of shards (the data_prep ``img2dataset`` source and ``inspect``, the style stage, the
pretraining loader) reads through this module, so they agree on what a sample is.

A damaged tar (truncated, garbage in a header) yields every complete sample before the damage and then raises
:class:`TarDamaged`, which says how many samples were read; the sample being read when the damage was met is not
yielded (its members may be incomplete). Callers count and report what is lost; they do not drop the whole tar.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import IO

Sample = dict[str, bytes]  # extension -> member bytes


class TarDamaged(tarfile.TarError):
    """A tar that could be read only up to ``samples`` complete samples (``cause``: what stopped the read)."""

    def __init__(self, path: str, samples: int, cause: BaseException) -> None:
        self.path, self.samples, self.cause = path, samples, cause
        super().__init__(f"{path}: damaged after {samples} complete samples ({type(cause).__name__}: {cause})")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, lower-cased extension)`` of a member name, or None when its base name has no extension."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not ext or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(path: str, fileobj: IO[bytes] | None = None) -> Iterator[tuple[str, Sample]]:
    """``(key, {ext: bytes})`` per sample of the tar at ``path`` (or the open ``fileobj``), in member order.

    Raises :class:`TarDamaged` after the complete samples when the tar is damaged (also when it cannot be opened).
    """
    done = 0
    current: str | None = None
    parts: Sample = {}
    try:
        size = os.fstat(fileobj.fileno()).st_size if fileobj is not None else os.path.getsize(path)
        with tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                named = split_member_name(member.name)
                if named is None:
                    continue
                key, ext = named
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
                if current is not None and key != current:
                    yield current, parts
                    done += 1
                    parts = {}
                current = key
                parts[ext] = data
            _check_end_marker(tar.offset, size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise TarDamaged(str(path), done, exc) from exc
    if current is not None:
        yield current, parts


def _check_end_marker(offset: int, size: int) -> None:
    """A complete tar ends with two zero blocks after its last member; tarfile stops quietly at a cut header."""
    if size < offset + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker: the file ends at byte {size}, inside member headers")


def count_tar_samples(path: str) -> tuple[int, TarDamaged | None]:
    """Samples of a tar from its member headers (seeks over the data, decodes nothing), with the same rule as
    :func:`iter_tar_samples`: on damage, the complete samples before it and the error, else ``(count, None)``."""
    keys = 0
    current: str | None = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} truncated (the file ends at byte {size})")
                named = split_member_name(member.name)
                if named is not None and named[0] != current:
                    keys += current is not None
                    current = named[0]
            _check_end_marker(tar.offset, size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        return keys, TarDamaged(str(path), keys, exc)
    return keys + (current is not None), None
