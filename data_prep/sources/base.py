"""What every source yields, and how bad input is reported without stopping the build."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Record:
    """One image with its captions, before decoding.

    Exactly one of ``path`` (a local file), ``url`` (fetched by the downloader) or ``data`` (encoded bytes, or a
    PIL image for generated sets) is set. ``orig_id`` is the source's own id; ``extra`` goes into the sample json.
    """

    orig_id: str
    captions: list[str]
    path: str | None = None
    url: str | None = None
    data: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Problem:
    """A bad annotation row or image, reported with where it came from and why."""

    file: str
    row: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} [{self.row}]: {self.reason}"


def clean_captions(value: Any) -> tuple[list[str], str | None]:
    """Normalise a caption field (str or list) into a list of non-empty strings, or a reason it is unusable."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return [], f"caption is not a string or list ({type(value).__name__})"
    caps = []
    for c in value:
        if not isinstance(c, str):
            return [], f"caption is not a string ({type(c).__name__})"
        c = " ".join(c.split())
        if c:
            caps.append(c)
    if not caps:
        return [], "empty caption"
    return caps, None


def load_json(path: str, key: str) -> Any:
    """Parse a whole annotation file; a missing or malformed file is a ConfigError naming ``key`` and the path."""
    import json

    from launch.config import ConfigError

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: file not found: {path}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON: {exc}") from exc
