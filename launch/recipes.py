"""The recipe loader of every entry point, by entry name: what ``python -m launch`` validates before it submits.

Each entry module registers the function its own ``main`` uses to load and check its recipe, with the recipe's
schema: ``@register("pretrain", PretrainConfig)`` on ``load(path, overrides) -> config``. The launchers look an
entry up here by name (its module is imported on first use, as the model registry does), so a recipe is
validated by the same code whether the entry starts locally or on a cluster. An entry that registers no loader
(a user's own module) is validated by itself when the job starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from launch.config import ConfigError
from launch.registry import Registry

# entry name -> the module that registers its recipe loader
MODULES = {
    "pretrain": "pretrain.config",
    "finetune": "finetune.config",
    "data_prep build": "data_prep.build",
    "data_prep style": "data_prep.style.stage",
    "data_prep synthetic": "data_prep.synthetic",
}

_RECIPES = Registry("entry", "", known=tuple(MODULES), module_of=MODULES.get)
register = _RECIPES.register  # decorator: @register("entry name", Schema) on ``load(path, overrides) -> config``

RecipeLoader = Callable[[Any, Sequence[str]], Any]


def _registered(entry: str) -> tuple[type, RecipeLoader] | None:
    """(schema, loader) that ``entry`` registered, or None when it is not an entry that registers one."""
    if entry not in MODULES:
        return None
    try:
        return _RECIPES.get(entry)
    except KeyError:
        raise ConfigError(f"entry {entry!r}: module {MODULES[entry]} registers no recipe loader") from None


def loader_of(entry: str) -> RecipeLoader | None:
    """The recipe loader ``entry`` registered, or None when it registers none."""
    found = _registered(entry)
    return found[1] if found else None


def schema_of(entry: str) -> type | None:
    """The recipe schema ``entry`` registered, or None when it registers none."""
    found = _registered(entry)
    return found[0] if found else None
