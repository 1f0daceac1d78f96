"""``python -m launch local <entry> --config <recipe> --nproc N [key=value ...]``: torchrun on this machine.

Also the pieces both submitters share: what an entry is (a module name plus an optional subcommand, started by
name so that launch, layer 0, imports nothing above it) and how the stage recipe's output folder is found
without knowing its schema.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.config import ConfigError, parse_overrides, read_yaml, set_dotted
from launch.dist import free_port

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SUB_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Stage config schemas known to launch, by name only (layer 0 imports nothing above it; the check runs in a child
# process). An entry that is not listed is validated by the entry itself when the job starts.
SCHEMAS = {
    "pretrain": "pretrain.config:PretrainConfig",
    "finetune": "finetune.config:FinetuneConfig",
    "data_prep build": "data_prep.build:BuildConfig",
    "data_prep style": "data_prep.style.stage:StageConfig",
    "data_prep synthetic": "data_prep.synthetic:SyntheticConfig",
}

_CHECK_CODE = """\
import importlib, sys
from launch.config import ConfigError, load_config
mod, _, attr = sys.argv[1].partition(':')
try:
    schema = getattr(importlib.import_module(mod), attr)
except (ImportError, AttributeError):
    sys.exit(0)  # schema not available here: the entry validates when the job starts
try:
    cfg = load_config(schema, sys.argv[3], sys.argv[4:])
    preflight = getattr(cfg, 'preflight', None)
    if callable(preflight) and sys.argv[2]:
        preflight(int(sys.argv[2]))
except ConfigError as exc:
    print(exc)
    sys.exit(2)
"""

# Entries that train with the shared engine: a requeued job must resume from the run's latest checkpoint.
TRAINING_ENTRIES = ("pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class Entry:
    """An entry point started by module name: ``pretrain``, ``finetune``, ``data_prep build``, ..."""

    module: str
    subcommand: str | None = None

    @property
    def name(self) -> str:
        return f"{self.module} {self.subcommand}" if self.subcommand else self.module

    @property
    def slug(self) -> str:
        """A file-name-safe form (``data_prep-build``)."""
        return self.name.replace(" ", "-").replace(".", "-")

    def argv(self, config: str, overrides: Sequence[str]) -> list[str]:
        """The entry's own command line (what follows ``python -m <module>``)."""
        head = [self.subcommand] if self.subcommand else []
        return [*head, "--config", str(config), *overrides]

    @property
    def trains(self) -> bool:
        return self.module in TRAINING_ENTRIES


def parse_entry(words: Sequence[str]) -> Entry:
    """``["data_prep", "build"]`` -> Entry; checks the names look like a module and a subcommand."""
    if not words or len(words) > 2:
        raise ConfigError("entry: expected a module and an optional subcommand, e.g. 'pretrain' or 'data_prep build'")
    module = words[0]
    if not _MODULE_RE.match(module):
        raise ConfigError(f"entry: {module!r} is not a module name")
    sub = words[1] if len(words) == 2 else None
    if sub is not None and not _SUB_RE.match(sub):
        raise ConfigError(f"entry: {sub!r} is not a subcommand name")
    return Entry(module, sub)


def split_entry(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``["data_prep", "build", "--config", ...]`` into entry words and the rest.

    Entry words are the leading tokens that are neither options nor ``key=value`` overrides.
    """
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2 and not argv[i].startswith("-") and "=" not in argv[i]:
        words.append(argv[i])
        i += 1
    return words, list(argv[i:])


def check_module(entry: Entry) -> None:
    """Fail early (in the submitting process) when the entry's package cannot be found; imports nothing."""
    import importlib.util

    top = entry.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ConfigError(f"entry: no module named {top!r} (run from the project root, or install the project)")


def stage_tree(config: str | os.PathLike, overrides: Sequence[str]) -> dict[str, Any]:
    """The stage recipe with ``key=value`` overrides applied, as a plain tree (no schema: launch is layer 0)."""
    tree = read_yaml(config)
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    return tree


def stage_dir(tree: dict[str, Any]) -> Path:
    """The stage's output folder: ``run.dir`` (pretrain, finetune) or ``out.dir`` (data_prep)."""
    for section in ("run", "out"):
        node = tree.get(section)
        if isinstance(node, dict) and node.get("dir"):
            return Path(str(node["dir"]))
    raise ConfigError("the stage recipe sets neither run.dir nor out.dir: launch needs an output folder for its logs")


def check_stage_config(
    entry: Entry, config: str, overrides: Sequence[str], world_size: int | None = None
) -> str | None:
    """Validate the stage recipe against its schema in a child process (by module name); returns an error or None.

    A child process because launch is layer 0: it must not import the entry's packages itself. With
    ``world_size``, the recipe's ``preflight(world_size)`` runs too (e.g. a resume that needs the same world size).
    """
    ref = SCHEMAS.get(entry.name)
    if ref is None:
        return None
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_CODE, ref, str(world_size or ""), config, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == 0:
        return None
    lines = proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["unknown error"]
    return lines[-1]


def torchrun_command(
    entry: Entry, config: str, overrides: Sequence[str], nproc: int, master_port: int | None = None
) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port P -m <module> ...``.

    The port is chosen free on this host so that two local runs do not collide.
    """
    if nproc < 1:
        raise ConfigError("--nproc: must be >= 1")
    port = master_port or free_port()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        entry.module,
        *entry.argv(config, overrides),
    ]


def run_local(
    entry: Entry,
    config: str,
    overrides: Sequence[str] = (),
    nproc: int = 1,
    dry_run: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Run the entry under torchrun on this machine; returns torchrun's exit status.

    The recipe is validated first, here (one ``config error:`` line, exit status 2, no worker started; also for
    ``dry_run``). The command is printed shell-quoted, so it can be pasted, and written to
    ``<run dir>/launch/local.json`` before it starts, so a run folder always says how it was started.
    """
    check_module(entry)
    tree = stage_tree(config, overrides)  # a malformed recipe or override fails here, before any worker starts
    out = stage_dir(tree)
    error = check_stage_config(entry, str(config), overrides, world_size=nproc)
    if error:
        raise ConfigError(error)
    cmd = torchrun_command(entry, config, overrides, nproc)
    print(f"run folder: {os.path.abspath(out)}", flush=True)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    record = out / "launch" / "local.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps(
            {"entry": entry.name, "command": cmd, "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
            indent=2,
        )
    )
    # no shell: the recipe path and overrides are data, passed as separate arguments
    return subprocess.call(cmd, env={**os.environ, **(env or {})})
