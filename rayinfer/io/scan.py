"""Finding the input files, describing each (rows per chunk, schema, how to read it) and checking
that they agree on one schema, before Ray starts."""

from __future__ import annotations

import glob as globlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayinfer.errors import InputError
from rayinfer.io.formats import describe
from rayinfer.io.formats.base import FORMATS, Source, format_of
from rayinfer.io.location import filesystem, uri_for


@dataclass(frozen=True)
class InputFile:
    path: str  # the key used in coverage: an absolute local path or a URI
    num_rows: int
    chunk_rows: tuple[int, ...]  # rows per chunk: row group, record batch or block of lines
    fingerprint: str = ""  # "size:mtime_ns": a rewritten file gets another (resume checks it)
    source: Source = Source("parquet")  # how its chunks are read


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, "input.path", InputError)


def list_files(path: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """(file, format) of each input file a spec's ``input.path`` names, sorted; an InputError
    when there are none. A folder with a ``state.json`` is a Hugging Face ``save_to_disk``
    dataset: its Arrow files, in the order state.json lists them (other .arrow files there, such
    as the caches ``map()`` leaves, are not data)."""
    if "://" not in path and any(ch in path for ch in "*?["):
        found = sorted(
            os.path.abspath(p) for p in globlib.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p)
        )
        if not found:
            raise InputError(f"input.path {path!r}: the glob matches no files")
        return _of_one_format(path, [(f, format_of(f, fmt)) for f in found], fmt)
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        found_fmt = format_of(fpath, fmt)
        if found_fmt is None:
            raise InputError(f"input.path {path!r}: cannot tell its format from the extension; set input.format "
                             f"({', '.join(FORMATS)})")
        return [(uri_for(fpath, path), found_fmt)]
    hf = _hugging_face_files(fs, fpath, path)
    if hf is not None:
        return [(f, "arrow") for f in hf]
    selector = pafs.FileSelector(fpath, recursive=True)
    files = [
        (uri_for(i.path, path), format_of(i.path, fmt))
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and not any(part.startswith((".", "_")) for part in os.path.relpath(i.path, fpath).split(os.sep))
    ]
    files = sorted((f, k) for f, k in files if k is not None)
    if not files:
        kinds = "files of format " + fmt if fmt != "auto" else "input files (.parquet, .arrow, .jsonl, .csv, ...)"
        raise InputError(f"input.path {path!r} is a folder with no {kinds} in it")
    return _of_one_format(path, files, fmt)


def _of_one_format(path: str, files: list[tuple[str, str | None]], fmt: str) -> list[tuple[str, str]]:
    kinds = sorted({k for _, k in files if k is not None})
    if len(kinds) > 1:
        raise InputError(f"input.path {path!r} holds files of several formats ({', '.join(kinds)}): "
                         "point it at one kind (a glob such as dir/*.parquet) or set input.format")
    unknown = [f for f, k in files if k is None]
    if unknown:
        raise InputError(f"input.path {path!r}: cannot tell the format of {unknown[0]!r} from its extension; "
                         f"set input.format ({', '.join(FORMATS)})")
    return [(f, k) for f, k in files if k is not None]


def _hugging_face_files(fs: pafs.FileSystem, folder: str, path: str) -> list[str] | None:
    """The data files of a ``datasets`` save_to_disk folder (None: the folder is not one)."""
    def read_json(name: str) -> Any:
        try:
            with fs.open_input_stream(f"{folder}/{name}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise InputError(f"input.path {path!r}: {name} is not valid JSON ({exc})") from None

    splits = read_json("dataset_dict.json")
    if splits is not None:
        names = ", ".join(splits.get("splits", []))
        raise InputError(f"input.path {path!r} is a Hugging Face DatasetDict; point it at one split's folder "
                         f"({names})")
    state = read_json("state.json")
    if state is None:
        return None
    data = [d.get("filename") for d in state.get("_data_files") or []]
    if not data or not all(isinstance(d, str) for d in data):
        raise InputError(f"input.path {path!r}: its state.json lists no data files (_data_files)")
    return [uri_for(f"{folder}/{name}", path) for name in data]


def fingerprint(path: str) -> str:
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    mtime = info.mtime_ns if info.mtime is not None else 0
    return f"{info.size}:{mtime}"


def scan(path: str, fmt: str = "auto", column_types: dict[str, str] | None = None,
         delimiter: str | None = None) -> tuple[list[InputFile], pa.Schema]:
    """Describe every input file (rows per chunk; for text formats the index of their blocks) and
    find one schema they all agree on. JSON Lines and CSV columns are typed once, from the first
    file (``column_types`` win), and every file is parsed into that schema."""
    types = {name: _data_type(name, t) for name, t in (column_types or {}).items()}
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    text_schema: pa.Schema | None = None
    first = ""
    for f, kind in list_files(path, fmt):
        chunk_rows, fschema, source = describe(f, kind, types, delimiter, text_schema)
        if kind in ("jsonl", "csv"):
            if source.schema is None:  # an empty text file: it has no rows, its columns are the others'
                files.append(InputFile(path=f, num_rows=0, chunk_rows=(), fingerprint=fingerprint(f), source=source))
                continue
            text_schema = fschema
        elif types:
            raise InputError(f"input.column_types is for JSON Lines and CSV inputs; {f!r} is {kind}, which "
                             "carries its own types")
        files.append(InputFile(path=f, num_rows=sum(chunk_rows), chunk_rows=chunk_rows, fingerprint=fingerprint(f),
                               source=source))
        if schema is None:
            schema, first = fschema, f
        else:
            for field in schema:
                other = fschema.field(field.name) if field.name in fschema.names else None
                if other is None:
                    raise InputError(f"input file {f!r} lacks column {field.name!r} that {first!r} has")
                if other.type != field.type:
                    raise InputError(
                        f"column {field.name!r} is {other.type} in {f!r} but {field.type} in {first!r}"
                    )
    return files, schema if schema is not None else pa.schema([])


def _data_type(column: str, name: str) -> pa.DataType:
    try:
        return pa.type_for_alias(name)
    except ValueError:
        raise InputError(f"input.column_types.{column}: {name!r} is not an Arrow type name (string, int64, "
                         "float64, bool, timestamp[s], ...)") from None


def is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_columns(schema: pa.Schema, needed: dict[str, str | None], where: str) -> None:
    """``needed`` maps a column to the dtype it must have ("string", a pyarrow type name, or None)."""
    for column, dtype in needed.items():
        if column not in schema.names:
            raise InputError(
                f"{where}: column {column!r} is not in the input. Columns: {', '.join(schema.names)}"
            )
        actual = schema.field(column).type
        if dtype == "string" and not is_string_type(actual):
            raise InputError(f"{where}: column {column!r} must be a string column, but it is {actual}")
        if dtype not in (None, "string") and str(actual) != dtype:
            raise InputError(f"{where}: column {column!r} must be {dtype}, but it is {actual}")
