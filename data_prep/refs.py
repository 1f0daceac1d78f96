"""``python -m data_prep convert-refs --refs 'refcoco+/refs(unc).p' --out refcoco+/refs.json``.

RefCOCO/RefCOCO+/RefCOCOg ship their referring expressions as a Python-2 pickle (``refs(unc).p``). Unpickling can
run arbitrary code, so this converter never trusts the file:

1. **Opcode scan first** (``pickletools.genops`` over the bytes, nothing is loaded): any opcode that can import a
   global, build an object or call something (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``NEWOBJ``,
   ``NEWOBJ_EX``, ``REDUCE``, ``BUILD``, ``EXT1/2/4``, ``PERSID``, ``BINPERSID``) refuses the file, naming the opcode
   and its byte offset. A list of dicts of strings and ints never contains them.
2. **Restricted unpickler**: ``find_class`` and ``persistent_load`` raise for every name, a second line of defence.
   Python-2 ``str`` objects are decoded as ASCII (what the public files need); on a decoding error the file is read
   again as latin-1 and every string is repaired with a latin-1 -> UTF-8 round trip where that is valid UTF-8.
3. **Schema validation** of every ref (``ref_id``, ``ann_id``, ``image_id``, ``category_id`` ints; ``split`` one of
   train/val/test/testA/testB/testC; ``sent_ids`` ints; ``sentences`` with ``sent_id`` int and ``sent`` str; optional
   ``raw``, ``tokens``, ``file_name``); the first problem is reported with the ref's position and key.
4. JSON out (atomic write). Training and evaluation read that JSON only; nothing downstream unpickles.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORBIDDEN_OPCODES = frozenset(
    {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD", "EXT1", "EXT2", "EXT4",
     "PERSID", "BINPERSID"}
)  # fmt: skip
SPLITS = ("train", "val", "test", "testA", "testB", "testC")
MAX_BYTES = 1 << 30


class UnsafePickleError(ValueError):
    """The pickle contains an opcode that can import or call: refused before loading."""


class RefsSchemaError(ValueError):
    """The unpickled data is not a RefCOCO refs list (the message names the ref and key)."""


def scan_opcodes(data: bytes) -> list[str]:
    """Names of the opcodes in ``data``; raises :class:`UnsafePickleError` at the first forbidden one."""
    names = []
    try:
        for opcode, _arg, pos in pickletools.genops(data):
            if opcode.name in FORBIDDEN_OPCODES:
                raise UnsafePickleError(
                    f"opcode {opcode.name} at byte {pos} can import or call code; refusing to load this pickle"
                )
            names.append(opcode.name)
    except UnsafePickleError:
        raise
    except Exception as exc:  # pickletools raises ValueError and others on malformed streams
        raise UnsafePickleError(f"not a well-formed pickle stream: {exc}") from exc
    return names


class _NoGlobals(pickle.Unpickler):
    """Allows no global and no persistent id (the documented "restricting globals" pattern, fully closed)."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"pickle asks for global {module}.{name}; no global is allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses a persistent id; not allowed")


def _repair(value: Any) -> Any:
    """latin-1 decoded Python-2 bytes -> the UTF-8 text they held (when they are valid UTF-8), recursively."""
    if isinstance(value, str):
        try:
            return value.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return value
    if isinstance(value, list):
        return [_repair(v) for v in value]
    if isinstance(value, dict):
        return {_repair(k): _repair(v) for k, v in value.items()}
    return value


def safe_load(data: bytes) -> Any:
    """Scan, then unpickle ``data`` without any global; Python-2 strings as ASCII, else latin-1 repaired."""
    scan_opcodes(data)
    try:
        return _NoGlobals(io.BytesIO(data), encoding="ASCII").load()
    except UnicodeDecodeError:
        return _repair(_NoGlobals(io.BytesIO(data), encoding="latin1").load())


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise RefsSchemaError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_refs(refs: Any, source: str = "refs") -> list[dict[str, Any]]:
    """The refs as plain JSON-able dicts; raises :class:`RefsSchemaError` naming the first bad ref and key."""
    _expect(isinstance(refs, list), source, f"expected a list of refs, got {type(refs).__name__}")
    out = []
    for i, ref in enumerate(refs):
        where = f"{source}[{i}]"
        _expect(isinstance(ref, dict), where, f"expected a dict, got {type(ref).__name__}")
        for key in ("ref_id", "ann_id", "image_id", "category_id"):
            _expect(_is_int(ref.get(key)), f"{where}.{key}", f"expected an int, got {ref.get(key)!r}")
        _expect(ref.get("split") in SPLITS, f"{where}.split", f"expected one of {SPLITS}, got {ref.get('split')!r}")
        sent_ids = ref.get("sent_ids")
        _expect(isinstance(sent_ids, list) and all(_is_int(s) for s in sent_ids), f"{where}.sent_ids",
                "expected a list of ints")  # fmt: skip
        sentences = ref.get("sentences")
        _expect(isinstance(sentences, list) and len(sentences) > 0, f"{where}.sentences", "expected a non-empty list")
        clean = []
        for j, s in enumerate(sentences):
            sw = f"{where}.sentences[{j}]"
            _expect(isinstance(s, dict), sw, "expected a dict")
            _expect(_is_int(s.get("sent_id")), f"{sw}.sent_id", f"expected an int, got {s.get('sent_id')!r}")
            _expect(isinstance(s.get("sent"), str), f"{sw}.sent", f"expected a str, got {s.get('sent')!r}")
            item = {"sent_id": s["sent_id"], "sent": s["sent"]}
            if "raw" in s:
                _expect(isinstance(s["raw"], str), f"{sw}.raw", "expected a str")
                item["raw"] = s["raw"]
            if "tokens" in s:
                _expect(isinstance(s["tokens"], list) and all(isinstance(t, str) for t in s["tokens"]),
                        f"{sw}.tokens", "expected a list of str")  # fmt: skip
                item["tokens"] = s["tokens"]
            clean.append(item)
        row = {k: ref[k] for k in ("ref_id", "ann_id", "image_id", "category_id", "split")}
        row["sent_ids"] = list(sent_ids)
        row["sentences"] = clean
        if "file_name" in ref:
            _expect(isinstance(ref["file_name"], str), f"{where}.file_name", "expected a str")
            row["file_name"] = ref["file_name"]
        out.append(row)
    return out


def convert_refs(refs_path: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, Any]:
    """Convert a refs pickle to JSON (see the module docstring); returns a summary (counts per split)."""
    src = Path(refs_path)
    if not src.is_file():
        raise FileNotFoundError(f"--refs: no such file: {src}")
    if src.stat().st_size > MAX_BYTES:
        raise ValueError(f"--refs: {src} is larger than {MAX_BYTES} bytes; not a refs file")
    data = src.read_bytes()
    refs = validate_refs(safe_load(data), str(src))
    dst = Path(out_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, dst)
    splits: dict[str, int] = {}
    for r in refs:
        splits[r["split"]] = splits.get(r["split"], 0) + len(r["sentences"])
    return {"refs": len(refs), "expressions_per_split": splits, "out": str(dst)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep convert-refs",
        description="Convert a RefCOCO-style refs pickle to JSON without executing anything from it.",
    )
    parser.add_argument("--refs", required=True, help="the refs pickle, e.g. refcoco+/refs(unc).p")
    parser.add_argument("--out", required=True, help="the JSON to write, e.g. refcoco+/refs.json")
    args = parser.parse_args(argv)
    try:
        summary = convert_refs(args.refs, args.out)
    except (UnsafePickleError, RefsSchemaError, FileNotFoundError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        print(f"convert-refs: {args.refs}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
