"""The docs point only at files that are in the repository."""

from __future__ import annotations

import re

from tests.helpers import REPO

TOP = "docs|configs|scripts|bench|experiments|tests|assets|data_prep|pretrain|finetune|launch"
GENERATED = {"docs/practice.md"}  # written by `python -m experiments practice` from the experiment reports
PATH = re.compile(rf"(?<![\w./:-])((?:{TOP})/[\w./-]+\.(?:md|py|yaml|json|sh|pth|png|txt))")


def _docs() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "README.md"]


def test_every_file_the_docs_name_exists():
    missing = []
    for doc in _docs():
        if not doc.is_file():
            continue
        for path in PATH.findall(doc.read_text()):
            if not (REPO / path).exists() and path not in GENERATED:
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, missing


def test_docs_do_not_point_outside_the_repository():
    for doc in _docs():
        if doc.is_file():
            text = doc.read_text()
            assert "DESIGN.md" not in text and "../shared" not in text, doc
