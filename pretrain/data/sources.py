"""What ``pretrain prepare`` reads: the inputs the user named, resolved and read as documents.

An input is a file, a directory, a glob or a Hugging Face dataset id (``owner/name[:config]``);
with none, the corpus is the running interpreter's standard library (``*.py`` files). Inputs
resolve to :class:`Source` groups of one format each, and :func:`iter_documents` yields every
document's text, source after source, in a deterministic order:

- text files (one file = one document) and JSON/JSONL files (one row = one document, the text
  field; a row without it is refused, naming its line) are read with plain Python, streamed, so
  a corpus larger than memory is fine and nothing beyond the core packages is needed;
- Parquet and CSV files and Hub datasets (one row = one document) need Hugging Face
  ``datasets``, imported only then.

Bad UTF-8 never stops a run: undecodable bytes become U+FFFD (counted by the writer), and a CSV
file with such bytes is read from a repaired copy, since its reader refuses them.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.data.format import one_line
from pretrain.errors import UserError

TEXT_FIELD = "text"
_JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
_BUILDER_BY_SUFFIX = {**dict.fromkeys(_JSON_SUFFIXES, "json"), ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


# --- inputs: what the user named, resolved to groups of local files or a Hub dataset -------------


@dataclass
class Source:
    """One read: local files of one format, or a Hub dataset id."""

    label: str  # what the user wrote, for messages
    builder: str  # text | json | parquet | csv | hub
    files: list[str] = field(default_factory=list)
    hub_id: str = ""
    hub_config: str | None = None


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard library sources: ``*.py`` under sysconfig's stdlib dir.

    Third-party packages and the stdlib's own test suites are left out; the order is the sorted
    relative path, so the corpus (several MB of real Python) is the same on every run of the same
    Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_label() -> str:
    """How the default corpus is named in the manifest: the Python version and its stdlib dir."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"python-stdlib-{version}:{sysconfig.get_paths()['stdlib']}"


def resolve_inputs(specs: list[str] | None) -> list[Source]:
    """Turn ``--input`` values (paths, directories, globs, Hub ids) into sources, in order."""
    if not specs:
        files = default_corpus_files()
        if not files:
            raise UserError(f"no *.py files under {sysconfig.get_paths()['stdlib']}; give --input")
        return [Source(default_corpus_label(), "text", [str(p) for p in files])]
    sources: list[Source] = []
    for spec in specs:
        sources += _resolve_one(spec)
    return _merge_consecutive(sources)


def _resolve_one(spec: str) -> list[Source]:
    """The sources of one ``--input`` value; one that names nothing is refused."""
    path = Path(os.path.expanduser(spec))
    if glob.has_magic(spec):
        matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"--input {spec}: the glob matches no files")
        return _group_by_format(spec, matches)
    if path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"--input {spec}: the directory holds no files")
        return _group_by_format(spec, files)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"--input {spec}: the file is empty")
        return _group_by_format(spec, [str(path)])
    if _HUB_ID.match(spec) and not path.suffix:
        hub_id, _, config = spec.partition(":")
        return [Source(spec, "hub", hub_id=hub_id, hub_config=config or None)]
    raise UserError(
        f"--input {spec}: not found (not a file, directory, glob or Hugging Face dataset id)"
    )


def _merge_consecutive(sources: list[Source]) -> list[Source]:
    """Neighbouring local sources of one format load together (one ``load_dataset`` call)."""
    merged: list[Source] = []
    for s in sources:
        last = merged[-1] if merged else None
        if last is not None and s.builder == last.builder != "hub":
            labels = last.label.split(", ")
            last.label = ", ".join(labels[:3] + (["..."] if len(labels) >= 3 else [s.label]))
            last.label = last.label.replace("..., ...", "...")
            last.files += s.files
        else:
            merged.append(Source(s.label, s.builder, list(s.files), s.hub_id, s.hub_config))
    return merged


def _builder_for(path: str) -> str:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return _BUILDER_BY_SUFFIX.get(suffixes[-1] if suffixes else "", "text")


def _group_by_format(label: str, files: list[str]) -> list[Source]:
    """Consecutive files of one format become one source (one ``load_dataset`` call)."""
    groups: list[Source] = []
    for f in files:
        builder = _builder_for(f)
        if not groups or groups[-1].builder != builder:
            groups.append(Source(label, builder))
        groups[-1].files.append(f)
    return groups


# --- UTF-8 repair --------------------------------------------------------------------------------


def _open_raw(path: str):
    opener = _COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb")


def _is_utf8(path: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_raw(path) as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _repair_utf8(path: str, out_dir: Path) -> str:
    """Copy ``path`` with undecodable bytes replaced by U+FFFD (the CSV reader refuses them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(path).name
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    target = out_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{name}"
    if target.exists():  # the second pass (after tokenizer training) reuses the copy
        return str(target)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with _open_raw(path) as src, open(target, "w", encoding="utf-8") as dst:
        while chunk := src.read(1 << 24):
            dst.write(decoder.decode(chunk))
        dst.write(decoder.decode(b"", final=True))
    return str(target)


# --- reading documents: text and JSON with plain Python, everything else through `datasets` ------


def _read_text_files(source: Source) -> Iterator[tuple[str, dict[str, str]]]:
    """One row per file: its whole text, compressed files decompressed.

    Bad bytes become U+FFFD (counted later), never a crash, and newlines are universal
    (``\r\n`` and ``\r`` read as ``\n``), as Python's text mode reads them.
    """
    for path in source.files:
        opener = _COMPRESSED.get(Path(path).suffix, open)
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            yield path, {TEXT_FIELD: f.read()}


def _read_json_files(source: Source) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of JSON-lines files (or a ``.json`` holding one array).

    Read with plain Python rather than ``datasets``, for two reasons: a row is named by its file
    and line in every message, and a row that lacks the text field stays distinguishable from
    one whose text is ``null`` (a table would fill the gap with null). Bad bytes become U+FFFD,
    as in text files.
    """
    for path in source.files:
        opener = _COMPRESSED.get(Path(path).suffix, open)
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:  # BOM or not
            head = f.read(4096).lstrip()
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            if head.startswith("["):  # one JSON array of rows
                yield from _json_array_rows(path, f)
            else:
                yield from _json_lines_rows(path, f)


def _json_array_rows(path: str, f) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({one_line(e)})") from None
    for index, row in enumerate(rows):
        yield f"{path} row {index + 1}", row


def _json_lines_rows(path: str, f) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(
                f"{path} line {number} is not valid JSON ({one_line(e)}); fix or remove it"
            ) from None
        yield f"{path} line {number}", row


def _load(source: Source, streaming: bool, scratch: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of one source; ``where`` names the row in messages."""
    if source.builder == "text":
        return _read_text_files(source)
    if source.builder == "json":
        return _read_json_files(source)
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"reading --input {source.label} ({source.builder}) needs the datasets package: "
            "pip install datasets (text and JSON files need only tokenizers)"
        ) from None
    try:
        if source.builder == "hub":
            dataset = datasets.load_dataset(
                source.hub_id, source.hub_config, split="train", streaming=streaming
            )
        else:
            files = source.files
            if source.builder == "csv":
                files = [f if _is_utf8(f) else _repair_utf8(f, scratch / "repaired") for f in files]
            dataset = datasets.load_dataset(
                source.builder, data_files=files, split="train", streaming=True
            )
    except UserError:
        raise
    except Exception as e:
        what = "the Hugging Face dataset" if source.builder == "hub" else "--input"
        raise UserError(f"could not load {what} {source.label}: {one_line(e)}") from None
    return ((f"--input {source.label} row {i + 1}", row) for i, row in enumerate(dataset))


def _row_text(row: Any, field_name: str, where: str) -> str:
    """The text of one row; a row without the field, or with a non-text value, is refused.

    A missing field is a schema error, not an empty document: counting it as empty would hide
    a corpus whose rows mostly lack the field. An explicit ``null`` is an empty document.
    """
    if not isinstance(row, dict):
        raise UserError(
            f"{where} is a JSON {type(row).__name__}, not an object with a '{field_name}' field"
        )
    if field_name not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise UserError(
            f"{where} has no field '{field_name}' (fields: {fields}); every row needs it: fix "
            "the row, or choose the field with --text-field"
        )
    text = row[field_name]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(
            f"{where}: field '{field_name}' holds {type(text).__name__}, not text; choose a "
            "text column with --text-field"
        )
    return text


def iter_documents(
    sources: list[Source], text_field: str, streaming: bool, scratch: Path
) -> Iterator[str]:
    """Every document's text, source after source, in a deterministic order.

    ``scratch`` is where repaired copies of files go; ``streaming`` streams Hub datasets.
    """
    for source in sources:
        field_name = TEXT_FIELD if source.builder == "text" else text_field
        rows = iter(_load(source, streaming, scratch))
        while True:
            try:
                where, row = next(rows)
            except StopIteration:
                break
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"could not read --input {source.label}: {one_line(e)}") from None
            yield _row_text(row, field_name, where)
