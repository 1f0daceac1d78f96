"""Where annotation paths may point and what names may go into a tar: the one place every reader and writer asks.

* :func:`resolve_in_root`: an image path from an annotation file (``file_name``, ``image``, ``filepath``...) is
  relative to its image root and must stay inside it. Absolute paths, ``..`` segments that climb out, drive
  letters and NUL bytes are refused with :data:`OUTSIDE_ROOT` (the failure reason counted in shard stats).
  The check is lexical: a symlink the user placed *inside* the root is followed (datasets are often linked in).
* :func:`check_member_key`: a sample key that becomes tar member names (``{key}.jpg``...) must be a relative
  name without ``..``/``.`` segments, empty segments, backslashes, control characters or a dot in its last
  segment (webdataset splits a member name at the first dot of its base name). Keys read from someone else's tar
  are checked before anything is written under them.
"""

from __future__ import annotations

import os
import posixpath

OUTSIDE_ROOT = "outside the image root"
UNSAFE_KEY = "unsafe key"


class PathError(ValueError):
    """A path or key that must not be used; ``reason`` is the short failure category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def resolve_in_root(root: str | os.PathLike, rel: str) -> str:
    """``root/rel`` when ``rel`` stays inside ``root``; raises :class:`PathError` (``outside the image root``).

    ``rel`` may use ``/`` or the platform separator; an empty root means the current folder.
    """
    if not isinstance(rel, str) or not rel:
        raise PathError(OUTSIDE_ROOT, f"empty image path {rel!r}")
    if "\x00" in rel:
        raise PathError(OUTSIDE_ROOT, f"{rel!r} contains a NUL byte")
    unified = rel.replace("\\", "/") if os.sep == "\\" else rel
    if posixpath.isabs(unified) or os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        raise PathError(OUTSIDE_ROOT, f"{rel!r} is an absolute path")
    norm = posixpath.normpath(unified)
    if norm == ".." or norm.startswith("../"):
        raise PathError(OUTSIDE_ROOT, f"{rel!r} climbs out of {os.fspath(root) or '.'}")
    return os.path.join(os.fspath(root) if root else "", *norm.split("/"))


def check_member_key(key: str) -> str:
    """``key`` unchanged when it is safe as the stem of tar member names; raises :class:`PathError` otherwise."""
    if not isinstance(key, str) or not key:
        raise PathError(UNSAFE_KEY, f"empty key {key!r}")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in key) or "\\" in key:
        raise PathError(UNSAFE_KEY, f"{key!r} contains a control character or backslash")
    if key.startswith("/"):
        raise PathError(UNSAFE_KEY, f"{key!r} is an absolute path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathError(UNSAFE_KEY, f"{key!r} has an empty, '.' or '..' segment")
    if "." in parts[-1]:
        raise PathError(UNSAFE_KEY, f"{key!r}: a dot in the last segment would split the member name")
    return key


__all__ = ["OUTSIDE_ROOT", "UNSAFE_KEY", "PathError", "check_member_key", "resolve_in_root"]
