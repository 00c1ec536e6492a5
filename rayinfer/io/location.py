"""Paths and URIs: one way to turn ``input.path`` / ``output.path`` into a pyarrow FileSystem.

Local paths (``~`` expanded, made absolute) use the local file system; anything with ``://``
goes through ``pyarrow.fs.FileSystem.from_uri``: ``s3://``, ``gs://``, ``abfs://``, ``hdfs://``,
``file://``. Credentials come from each node's environment (``AWS_ACCESS_KEY_ID``, an instance
role, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from the URI: paths are printed and written
into every output part and the manifest, so a secret in a URI (its user part, as in
``s3://KEY:SECRET@bucket``, or a query parameter such as ``secret_key=``) would be copied into the
results. ``refuse_credentials`` refuses both forms before anything is opened.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from rayinfer.errors import SECRET_PARAMS, scrub_secrets


_KEY_AS_USER = {"s3", "gs", "gcs", "abfs", "abfss", "az"}
"""URI schemes whose user part, when given, is an access key (pyarrow's ``s3://KEY:SECRET@bucket``)."""

OBJECT_STORES = {"s3", "gcs", "abfs"}
"""File systems without rename, where an object becomes visible whole when its upload completes."""


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A spec path as rayinfer keeps it: a URI as given, a local path with ``~`` expanded and made
    absolute (the one place that does it)."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def local_path(path: str) -> str | None:
    """The local file system path a spec path names (also for ``file://``), or None for a remote URI."""
    if not is_uri(path):
        return absolute(path)
    if path.startswith("file://"):
        return urlsplit(path).path
    return None


def filesystem(path: str, what: str, error: type[Exception]) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI; ``error`` names what went wrong."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    refuse_credentials(path, what, error)
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except Exception as exc:  # unknown scheme, malformed URI, unreachable endpoint
        raise error(f"{what} {redact(path)!r}: cannot open it ({scrub_secrets(str(exc))})") from None
    return fs, inner.rstrip("/") or inner


def uri_credentials(path: str) -> list[str]:
    """What credentials a spec path carries in its URI: "the user part" (``s3://KEY:SECRET@bucket``;
    for object stores a user name alone too, which there is an access key; ``hdfs://user@host`` is
    a user name, not a secret) and secret query parameters."""
    if not is_uri(path):
        return []
    user_part = ["the user part (before '@')"]
    try:
        parts = urlsplit(path)
        secret_user = parts.password is not None or (bool(parts.username) and parts.scheme in _KEY_AS_USER)
    except ValueError:  # malformed (a bad port after a password, say): refuse what looks like one
        return user_part if "@" in path.split("://", 1)[1].split("/", 1)[0] else []
    found = user_part if secret_user else []
    return found + sorted(k for k, _ in parse_qsl(parts.query) if k.lower() in SECRET_PARAMS)


def refuse_credentials(path: str, what: str, error: type[Exception]) -> None:
    """Refuse a path whose URI carries credentials, before anything is opened, without repeating
    them: the planner, ``rayinfer submit`` and every file system opened call this."""
    found = uri_credentials(path)
    if found:
        raise error(
            f"{what} {redact(path)!r} carries credentials in the URI ({', '.join(found)}), which would be printed "
            "and written into every output part and the manifest: set them in the environment of each node instead "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or an instance role)"
        )


def uri_for(inner: str, original: str) -> str:
    """The URI of ``inner`` (a path inside the file system of ``original``), keeping the scheme and
    the query (``?endpoint_override=...``) so that any node can open it again from the string."""
    if not is_uri(original):
        return inner
    parts = urlsplit(original)
    if parts.scheme == "file":
        return f"file://{inner}"
    # s3://bucket/key -> "bucket/key"; hdfs://host:8020/dir -> "/dir" (keep the host)
    where = f"{parts.netloc}{inner}" if inner.startswith("/") else inner
    return f"{parts.scheme}://{where}" + (f"?{parts.query}" if parts.query else "")


def redact(path: str) -> str:
    """A path as rayinfer shows it: a URI's credentials masked (``scrub_secrets``)."""
    return scrub_secrets(path) if is_uri(path) else path


def location_key(path: str) -> tuple[str, str]:
    """(scheme, normalized path) of a spec path, for comparing where two paths point. A glob
    counts as the folder above its first wildcard. Local paths are resolved (symlinks too)."""
    if not is_uri(path) or path.startswith("file://"):
        local = local_path(path) or path
        cut = min((i for i, ch in enumerate(local) if ch in "*?["), default=len(local))
        base = local[:cut].rsplit("/", 1)[0] if cut < len(local) else local
        return "file", os.path.realpath(base or "/")
    parts = urlsplit(path)
    return parts.scheme, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


def is_glob(path: str) -> bool:
    return not is_uri(path) and any(ch in path for ch in "*?[")


def nested(a: str, b: str) -> bool:
    """Whether spec paths ``a`` and ``b`` are the same place or one lies inside the other. A glob
    (``a`` or ``b``) is judged by what it can match: whether some file under the other path (a
    folder) could be one of its matches, or the other path lie under one of them."""
    if is_glob(a) or is_glob(b):
        pattern, other = (a, b) if is_glob(a) else (b, a)
        if is_glob(other):  # two globs: by the folders above their wildcards
            return _keys_nested(location_key(a), location_key(b))
        return glob_reaches(pattern, other)
    return _keys_nested(location_key(a), location_key(b))


def _keys_nested(ka: tuple[str, str], kb: tuple[str, str]) -> bool:
    (sa, pa_), (sb, pb) = ka, kb
    if sa != sb:
        return False
    return pa_ == pb or pb.startswith(pa_.rstrip("/") + "/") or pa_.startswith(pb.rstrip("/") + "/")


def glob_reaches(pattern: str, folder: str) -> bool:
    """Whether the local glob ``pattern`` (``**`` recursive, as ``input.path`` reads it) can match
    a path under ``folder``, the folder itself or a file it may hold: ``data/in-*.parquet`` cannot
    reach ``data/predictions``; ``data/**/*.parquet`` and ``data/*/*.parquet`` can. Symlinks in
    the literal part of either are resolved."""
    if is_uri(folder) and not folder.startswith("file://"):
        return False  # a glob is local; a remote folder is elsewhere
    local = local_path(pattern) or pattern
    cut = min(i for i, ch in enumerate(local) if ch in "*?[")
    head, _, _ = local[:cut].rpartition("/")
    rest = [c for c in local[len(head):].split("/") if c]
    pat = [c for c in os.path.realpath(head or "/").split("/") if c] + rest
    target = [c for c in os.path.realpath(local_path(folder) or folder).split("/") if c]

    @functools.lru_cache(maxsize=None)
    def reach(i: int, j: int) -> bool:
        if j == len(target):  # the folder reached: what is left of the pattern can name a file in it
            return i < len(pat)
        if i == len(pat):  # the pattern ends above the folder: it names a folder, not the files in it
            return False
        if pat[i] == "**":  # zero or more folders
            return reach(i + 1, j) or reach(i, j + 1)
        return fnmatch.fnmatchcase(target[j], pat[i]) and reach(i + 1, j + 1)

    return reach(0, 0)
