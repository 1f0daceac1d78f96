"""A registry by name with an options schema per entry, importing ``<package>.<name>`` on first use.

Models (``pretrain.models``) and fine-tuning tasks (``finetune.tasks``) both use it: adding one means adding one
file that calls ``register`` at import time, and a recipe. Unknown names get a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Sequence
from typing import Any


class Registry:
    """``name -> (options dataclass, object)``; ``object`` is whatever the kind needs (a build function, a class)."""

    def __init__(
        self, kind: str, package: str, known: Sequence[str], module_of: Callable[[str], str | None] | None = None
    ) -> None:
        self.kind = kind
        self.package = package
        self.known = tuple(known)
        self.module_of = module_of or (lambda name: f"{package}.{name}")  # where ``name`` registers itself
        self._entries: dict[str, tuple[type, Any]] = {}

    def register(self, name: str, options: type) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under ``name`` with its options dataclass."""
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options for {self.kind} {name!r} must be a dataclass")

        def wrap(obj: Any) -> Any:
            self._entries[name] = (options, obj)
            return obj

        return wrap

    def get(self, name: str) -> tuple[type, Any]:
        """The (options dataclass, object) registered under ``name``, importing its module on first use."""
        module = self.module_of(name) if name not in self._entries else None
        if module:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(set(self.known) | set(self._entries))
