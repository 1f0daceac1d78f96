"""``python -m data_prep build|inspect|synthetic|convert-refs|style|style-set|train-style ...``.

Each subcommand's module is imported only when chosen. ``train-style`` trains the style network with the shared
pretraining engine; data_prep (layer 1) must not import pretrain (layer 2), so it starts ``python -m pretrain`` as a
child process by module name and passes the arguments through.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Sequence

COMMANDS = {
    "build": ("data_prep.build", "build webdataset shards from a dataset recipe (configs/data_prep/*.yaml)"),
    "inspect": ("data_prep.inspect", "counts, caption lengths, failures and a contact sheet of built shards"),
    "synthetic": ("data_prep.synthetic", "build the built-in synthetic image-text set"),
    "convert-refs": ("data_prep.refs", "RefCOCO refs pickle -> JSON (opcode scan, no globals, schema check)"),
    "style": ("data_prep.style.stage", "apply style randomization to shards (sharded over ranks)"),
    "style-set": ("data_prep.style.procedural", "draw the deterministic procedural style image set"),
    "train-style": (None, "train the style network: runs `python -m pretrain` (default configs/pretrain/style.yaml)"),
}
STYLE_RECIPE = "configs/pretrain/style.yaml"  # pretrain's --config resolves it from any working directory


def _usage() -> str:
    lines = ["usage: python -m data_prep <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m data_prep <command> --help` for a command's options")
    return "\n".join(lines)


def train_style(argv: Sequence[str]) -> int:
    """Run the style-network pretraining recipe in a child ``python -m pretrain`` process."""
    args = list(argv)
    if "--config" not in args and not any(a.startswith("--config=") for a in args) and "-h" not in args:
        args = ["--config", STYLE_RECIPE, *args]
    return subprocess.call([sys.executable, "-m", "pretrain", *args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if cmd == "train-style":
        return train_style(rest)
    module = importlib.import_module(COMMANDS[cmd][0] or "")
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
