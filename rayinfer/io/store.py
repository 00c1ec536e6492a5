"""An output folder, local or on an object store, and the names rayinfer writes in it."""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayinfer.errors import OutputError
from rayinfer.io.location import OBJECT_STORES, absolute, filesystem, redact, uri_for

MANIFEST = "_manifest.json"  # "_" so Parquet readers of the folder skip it, like Spark's _SUCCESS


TMP_DIR = ".tmp"


LOCK = "_rayinfer.lock"  # the running run's lease on the folder (rayinfer/io/lock.py)


def is_lock(name: str) -> bool:
    """The lock, or the moment's temporary file a run creates it from (``.{LOCK}.<token>``)."""
    return name == LOCK or name.startswith(f".{LOCK}.")


PART_PREFIX = "part-"


class Store:
    """An output folder: a local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``file://...``).

    Every write is atomic for readers: on file systems with rename (local, HDFS, ``file://``) a
    part is written under ``.tmp/`` and moved into place; on object stores (S3, GCS, Azure), which
    have no rename, the whole part is uploaded in one request and appears only once complete.
    Picklable as its location string, so each actor opens it with its own node's credentials.
    """

    def __init__(self, location: str) -> None:
        self.location = absolute(location)
        self.fs, self.root = filesystem(location, "output.path", OutputError)
        self.object_store = self.fs.type_name in OBJECT_STORES

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.location,))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        return uri_for(self.path(name), self.location)

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.root)
        except OSError as exc:  # credentials, network, missing bucket
            raise OutputError(f"output.path {redact(self.location)!r}: cannot reach it ({exc})") from None

    def names(self) -> list[str]:
        """Names directly inside the folder (none when it does not exist)."""
        if self.info().type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def parts(self) -> list[str]:
        return [n for n in self.names() if n.startswith(PART_PREFIX) and n.endswith(".parquet")]

    def put(self, name: str, data: bytes | pa.Buffer) -> None:
        if self.object_store:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        tmp_dir = self.path(TMP_DIR)
        self.fs.create_dir(tmp_dir, recursive=True)
        tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(name))

    def put_file(self, name: str, local_file: str) -> None:
        """Commit a finished local file as ``name``: moved into place, or uploaded whole."""
        if self.object_store:
            with open(local_file, "rb") as src, self.fs.open_output_stream(self.path(name)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.unlink(local_file)
        else:
            self.fs.move(local_file, self.path(name))

    def temp_file(self, name: str) -> str:
        """A path to write ``name`` to before it is committed: under ``.tmp/`` beside the parts on
        file systems (a rename then commits it), a local temp file for object stores."""
        if self.object_store:
            fd, path = tempfile.mkstemp(prefix="rayinfer-part-", suffix=f"-{name}")  # put_file deletes it
            os.close(fd)
            return path
        tmp_dir = self.path(TMP_DIR)
        self.fs.create_dir(tmp_dir, recursive=True)
        return f"{tmp_dir}/{name}.{uuid.uuid4().hex}.tmp"

    def read(self, name: str) -> bytes:
        with self.fs.open_input_file(self.path(name)) as f:
            return f.read()

    def open(self, name: str) -> pa.NativeFile:
        return self.fs.open_input_file(self.path(name))

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))

    def clear_tmp(self) -> None:
        if not self.object_store:
            try:
                self.fs.delete_dir(self.path(TMP_DIR))
            except (FileNotFoundError, OSError):
                pass


def list_parts(out_dir: str | Store) -> list[str]:
    """The committed part names in an output folder, sorted."""
    return as_store(out_dir).parts()


def as_store(out_dir: str | Path | Store) -> Store:
    return out_dir if isinstance(out_dir, Store) else Store(str(out_dir))
