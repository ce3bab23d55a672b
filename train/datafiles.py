"""Reading a data file and checking it: every problem is a ValueError that names the file, the 1-based line
(or the byte offset, the JSON line and column) and what was expected; nothing is skipped silently.

    read_text            the bytes (gunzipped if .gz) as UTF-8, a BOM dropped; else a fallback encoding, else
                         the line and byte offset of the first invalid byte
    read_lines           lines split on "\\n" only (str.splitlines would also split on U+0085/U+2028 in a text)
    check_header         line 1 must be the header; a header-less file says so
    read_text_label_csv  a "text,label" CSV whose texts may span lines, with the line each row starts on
    read_json            JSON with the line and column of a syntax error, and "truncated?" when it ends early
    json_field           obj[key] checked to be of a JSON type, named by its JSON path (data[3].paragraphs[0])
    check_label          a label, by name or by index, as an index into the label names
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Sequence


def read_text(path: Path, fallback: str | None = None) -> str:
    """The file (gunzipped if .gz) decoded as UTF-8 (a BOM is dropped), else as `fallback`, else a ValueError."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # bad header, truncated stream, corrupt data
            raise ValueError(f"{path}: not a readable gzip file ({e}); expected a gzip-compressed CSV") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if fallback:
            return raw.decode(fallback)
        line = raw.count(b"\n", 0, e.start) + 1
        of = " of the uncompressed data" if path.suffix == ".gz" else ""
        raise ValueError(f"{path} line {line}: byte 0x{raw[e.start]:02x} at byte offset {e.start}{of} is not "
                         "valid UTF-8; the file must be UTF-8 (re-save it with that encoding)") from None


def read_lines(path: Path, fallback: str | None = None) -> list[str]:
    """Lines split on "\\n" only (str.splitlines would also split on U+0085/U+2028 inside a text)."""
    lines = [line.removesuffix("\r") for line in read_text(path, fallback).split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def check_header(path: Path, got: str | None, expected: str) -> None:
    if got is None:
        raise ValueError(f"{path} is empty; expected the header row {expected!r}, then one row per example")
    if got != expected:
        raise ValueError(f"{path} line 1: expected the header row {expected!r}, got {got[:80]!r}; if line 1 is "
                         "already data, add the header above it (line 1 is always read as the header)")


def read_text_label_csv(path: Path) -> list[tuple[str, str, int]]:
    """(text, label, line the row starts on) of every row under the header; the texts may span lines."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)  # strict: no silent repairs
    out, start = [], 1
    try:
        header = next(reader, None)
        check_header(path, None if header is None else ",".join(header), "text,label")
        start = reader.line_num + 1
        for record in reader:
            if len(record) != 2:
                raise ValueError(f"{path} line {start}: expected 2 fields (text,label), got {len(record)}: "
                                 f"{','.join(record)[:80]!r}")
            out.append((record[0], record[1], start))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV in the row starting at line {start} ({e})") from None
    return out


def read_json(path: Path, expected: str):
    """The parsed JSON of `path`; empty or invalid JSON is a ValueError with the line and column."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {expected}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")  # open at the end
        cut = " (the file ends before the JSON does: truncated?)" if truncated else ""
        msg = e.msg.removesuffix(" starting at")  # the position follows in our own words
        raise ValueError(f"{path} line {e.lineno}, column {e.colno}: invalid JSON: {msg}{cut}") from None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
               float: "a number", type(None): "null"}


def json_field(obj, key: str, kind: type, path: Path, at: str, layout: str):
    """obj[key], checked to be of `kind`; `at` is the JSON path of obj and `layout` the expected one, for the
    message."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {at} should be an object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
    if key not in obj:
        raise ValueError(f"{path}: {at} has no {key!r}; expected {layout}")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{path}: {at}.{key} should be {_JSON_TYPES[kind]}, "
                         f"got {_JSON_TYPES.get(type(obj[key]), type(obj[key]).__name__)}")
    return obj[key]


def check_label(label, names: Sequence[str], where: str, text: str) -> int:
    """The label (a name, or its index) as an int index into `names`; a ValueError naming the row otherwise."""
    if isinstance(label, str):
        key = label.strip()
        if key.lower() in names:
            return names.index(key.lower())
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = -1
    if 0 <= value < len(names) and str(label).strip() in (str(value), f"{value}.0"):
        return value
    raise ValueError(f"{where}: label {label!r} is not one of {names} (or their ids 0..{len(names) - 1}); "
                     f"text: {text[:80]!r}")
