"""Where rendered documents live, behind :class:`DocumentStore`.

A location is an opaque string returned by :meth:`DocumentStore.put` and stored alongside
the invoice. :class:`LocalDocumentStore` returns the key itself (a relative path under its
root); an S3 implementation will return ``s3://bucket/key`` style locations.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol


class DocumentStore(Protocol):
    async def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``, replacing any previous version; return its location."""
        ...

    async def get(self, location: str) -> bytes: ...

    async def exists(self, location: str) -> bool: ...


class LocalDocumentStore(DocumentStore):
    """Documents as files under ``root``; keys look like ``invoices/<tenant>/<number>.pdf``.

    Writes are atomic (temporary file in the target directory, then ``os.replace``), so a
    retried activity never leaves a half-written PDF behind.
    """

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def _path(self, key: str) -> Path:
        """The file for ``key``; refuses keys that could point outside the root. Touches the disk."""
        relative = PurePosixPath(key)
        if not key or "\\" in key or relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"invalid document key {key!r}: must be a relative path inside the store")
        path = (self._root / relative).resolve()  # also catches symlinks pointing out
        if path == self._root or not path.is_relative_to(self._root):
            raise ValueError(f"invalid document key {key!r}: escapes the store root")
        return path

    def _put(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), data)

    def _get(self, location: str) -> bytes:
        return self._path(location).read_bytes()

    def _exists(self, location: str) -> bool:
        return self._path(location).is_file()

    async def put(self, key: str, data: bytes) -> str:
        await asyncio.to_thread(self._put, key, data)
        return key

    async def get(self, location: str) -> bytes:
        return await asyncio.to_thread(self._get, location)

    async def exists(self, location: str) -> bool:
        return await asyncio.to_thread(self._exists, location)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise
