"""Finding the input files, describing each (rows per chunk, schema, how to read it) and checking
that they agree on one schema, before Ray starts."""

from __future__ import annotations

import csv
import glob as globlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayinfer.errors import InputError
from rayinfer.io.formats import describe
from rayinfer.io.formats.base import FORMATS, Source, format_of, resolve_json
from rayinfer.io.location import filesystem, uri_for


@dataclass(frozen=True)
class InputFile:
    path: str  # the key used in coverage: an absolute local path or a URI
    num_rows: int
    chunk_rows: tuple[int, ...]  # rows per chunk: row group, record batch or block of lines
    fingerprint: str = ""  # "size:mtime_ns": a rewritten file gets another (resume checks it)
    source: Source = Source("parquet")  # how its chunks are read
    conform: tuple[pa.Schema, pa.Schema] | None = None  # (its schema, the dataset's) where they differ


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
        return _of_one_format(path, [(f, _resolved(f, format_of(f, fmt))) for f in found], fmt)
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        found_fmt = format_of(fpath, fmt)
        if found_fmt is None:
            raise InputError(f"input.path {path!r}: cannot tell its format from the extension; set input.format "
                             f"({', '.join(FORMATS)})")
        return [(uri_for(fpath, path), _resolved(uri_for(fpath, path), found_fmt) or found_fmt)]
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
    files = sorted((f, _resolved(f, k)) for f, k in files if k is not None)
    if not files:
        kinds = "files of format " + fmt if fmt != "auto" else "input files (.parquet, .arrow, .jsonl, .csv, ...)"
        raise InputError(f"input.path {path!r} is a folder with no {kinds} in it")
    return _of_one_format(path, files, fmt)


def _resolved(path: str, kind: str | None) -> str | None:
    """A ``.json`` file's format: JSON Lines when its first line is an object (else refused)."""
    return resolve_json(path) if kind == "json" else kind


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
         delimiter: str | None = None, required: tuple[str, ...] = (), id_column: str | None = None,
         text_columns: tuple[str, ...] = ()) -> tuple[list[InputFile], pa.Schema]:
    """Describe every input file (rows per chunk; for text formats the index of their blocks) and
    find the one schema of the dataset. JSON Lines and CSV columns are typed once, from the first
    file whose first records type any column (``column_types`` win; the ``text_columns``, which
    the task reads as text, are text: a number there makes that row malformed, an error row, where
    it would otherwise type the column for every file), and every file is parsed into that
    schema. Parquet and Arrow
    files are unified (``unify``): text is text whatever its Arrow type, numbers widen, a column
    some files lack is null there; the ``required`` columns (the id and what the task reads) must
    be in every file. Parquet and Arrow files whose ``id_column`` holds nulls are refused."""
    types = {name: _data_type(name, t) for name, t in (column_types or {}).items()}
    listed = list_files(path, fmt)
    files: list[InputFile] = []
    schemas: dict[str, pa.Schema] = {}
    first_text, first = _first_typed(listed, types, delimiter, text_columns)
    text_schema: pa.Schema | None = first[1] if first else None
    for f, kind in listed:
        if f == first_text and first:
            chunk_rows, fschema, source = first
        else:
            chunk_rows, fschema, source = describe(f, kind, types, delimiter, text_schema)
        if kind in ("jsonl", "csv"):
            if source.schema is None:  # an empty text file: it has no rows, its columns are the others'
                files.append(InputFile(path=f, num_rows=0, chunk_rows=(), fingerprint=fingerprint(f), source=source))
                continue
            if not fschema.names:  # rows, none of them a record: so is every other text file's
                raise InputError(f"input file {f!r}: none of its first lines is a JSON object, nor any other input "
                                 "file's: JSON Lines holds one object per line, such as {\"id\": 1, \"text\": \"...\"}")
            if kind == "csv" and text_schema is not None:  # its header: a column the job reads must be there
                header = next(csv.reader([source.header.decode("utf-8", "replace")], delimiter=source.delimiter), [])
                for column in required:
                    if column in text_schema.names and column not in header:
                        raise InputError(f"input file {f!r} lacks column {column!r} that {first_text!r} has (and the "
                                         "job reads it)")
        elif types:
            raise InputError(f"input.column_types is for JSON Lines and CSV inputs; {f!r} is {kind}, which "
                             "carries its own types")
        else:
            _refuse_null_ids(f, kind, fschema, id_column)
        files.append(InputFile(path=f, num_rows=sum(chunk_rows), chunk_rows=chunk_rows, fingerprint=fingerprint(f),
                               source=source))
        schemas[f] = fschema
    if not schemas:
        return files, pa.schema([])
    schema = unify(schemas, required)
    files = [replace(i, conform=(schemas[i.path], schema)) if i.path in schemas and not _same(schemas[i.path], schema)
             else i for i in files]
    return files, schema


def _first_typed(listed: list[tuple[str, str]], types: dict[str, pa.DataType], delimiter: str | None,
                 text_columns: tuple[str, ...]) -> tuple[str, tuple[tuple[int, ...], pa.Schema, Source] | None]:
    """The first text file whose first records type any column, and its description: the one
    schema every text file is parsed into (a file whose every sampled line is malformed types
    nothing; it is parsed into the next one's schema, its lines there error rows). Of its
    columns, the ``text_columns`` are text unless ``types`` say otherwise."""
    for f, kind in listed:
        if kind in ("jsonl", "csv"):
            chunk_rows, schema, source = describe(f, kind, types, delimiter, None)
            if schema.names:
                schema = pa.schema([pa.field(fl.name, pa.string()) if fl.name in text_columns and fl.name not in types
                                    else fl for fl in schema])
                return f, (chunk_rows, schema, replace(source, schema=schema))
    return "", None


def _same(a: pa.Schema, b: pa.Schema) -> bool:
    return a.names == b.names and a.types == b.types


def unify(schemas: dict[str, pa.Schema], required: tuple[str, ...] = ()) -> pa.Schema:
    """The one schema of files whose schemas may drift, as pandas, Polars and Spark write them:
    ``string``, ``large_string``, ``string_view`` and dictionary-encoded text are text
    (``large_string`` where any file has it), integers widen (int32 and int64: int64; an int and
    a float: float64), a column that some files lack is in the schema and null in those files.
    Refused, naming both files: a column whose types cannot be one (text in one file, a list in
    another), and a ``required`` column that a file lacks."""
    names = list(schemas)
    first, first_schema = names[0], schemas[names[0]]
    for f, sch in schemas.items():
        for column in required:
            if column in first_schema.names and column not in sch.names:
                raise InputError(f"input file {f!r} lacks column {column!r} that {first!r} has (and the job reads it)")
            if column not in first_schema.names and column in sch.names:
                raise InputError(f"input file {first!r} lacks column {column!r} that {f!r} has (and the job reads it)")
    if all(_same(s, first_schema) for s in schemas.values()):
        return first_schema
    text: dict[str, pa.DataType] = {}  # the text columns' one type
    seen: dict[str, tuple[str, pa.DataType]] = {}  # the first file and type of each column
    for f, sch in schemas.items():
        for field in sch:
            was = seen.setdefault(field.name, (f, field.type))
            if is_string_type(field.type) or is_string_type(was[1]):
                if not (is_string_type(field.type) and is_string_type(was[1])):
                    raise _conflict(field.name, was, (f, field.type))
                large = pa.types.is_large_string(_plain(field.type)) or text.get(field.name) == pa.large_string()
                text[field.name] = pa.large_string() if large else pa.string()
    plain = [pa.schema([pa.field(fl.name, text.get(fl.name, fl.type), fl.nullable) for fl in s]) for s in schemas.values()]
    try:
        unified = pa.unify_schemas(plain, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # name the two files that disagree
        for f, sch in zip(names, plain):
            try:
                pa.unify_schemas([plain[0], sch], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                column = next(fl.name for fl in sch if fl.name in plain[0].names and fl.type != plain[0].field(fl.name).type
                              and _unmergeable(plain[0].field(fl.name).type, fl.type))
                raise _conflict(column, (first, schemas[first].field(column).type), (f, schemas[f].field(column).type)) from None
        raise
    return unified.remove_metadata().with_metadata(first_schema.metadata)


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _unmergeable(a: pa.DataType, b: pa.DataType) -> bool:
    try:
        pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive")
        return False
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return True


def _conflict(column: str, a: tuple[str, pa.DataType], b: tuple[str, pa.DataType]) -> InputError:
    return InputError(f"column {column!r} is {b[1]} in {b[0]!r} but {a[1]} in {a[0]!r}: the files of one input must "
                      "agree on what each column holds (text, numbers, lists); convert one of them")


def _refuse_null_ids(path: str, kind: str, schema: pa.Schema, id_column: str | None) -> None:
    """Refuse a Parquet or Arrow file whose id column holds nulls (from the Parquet footer's null
    counts where it has them, else by reading that column alone): an output row without its id
    cannot be joined back to its input, and resume and retry could not tell such rows apart."""
    if id_column is None or id_column not in schema.names:
        return
    nulls = _null_count(path, kind, id_column)
    if nulls:
        raise InputError(f"input file {path!r} has {nulls} row(s) whose id (column {id_column!r}) is null: every row "
                         "needs an id to be joined back to its input (and resumed, and retried); fill them in, or "
                         "set input.id_column to a column that identifies every row")


def _null_count(path: str, kind: str, column: str) -> int:
    from rayinfer.io.formats import open_chunks
    from rayinfer.io.formats.binary import open_parquet

    if kind == "parquet":
        pf = open_parquet(path)
        try:
            md = pf.metadata
            leaves = [j for j in range(md.num_columns) if md.schema.column(j).path == column]
            count = 0
            for rg in range(md.num_row_groups):
                stats = md.row_group(rg).column(leaves[0]).statistics if leaves else None
                if stats is None or not stats.has_null_count:
                    return pf.read(columns=[column]).column(column).null_count
                count += stats.null_count
            return count
        finally:
            pf.close()
    reader = open_chunks(path, Source(kind))
    try:
        count = 0
        for i in range(len(reader.chunk_rows())):
            for piece in reader.chunk(i, [column], 1 << 20):
                count += piece.table.column(column).null_count
        return count
    finally:
        reader.close()


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
