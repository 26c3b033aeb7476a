"""Where rendered documents live, behind :class:`DocumentStore`.

A location is an opaque string returned by :meth:`DocumentStore.put` and stored alongside
the invoice. :class:`LocalDocumentStore` returns the key itself (a relative path under its
root); :class:`S3DocumentStore` returns ``s3://bucket/key``. ``DOCUMENTS_BACKEND`` picks one
(:func:`document_store`). The S3 store also hands out presigned download URLs, so the API
redirects a PDF download to the bucket instead of streaming it through itself.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from core.settings import Settings


class DocumentStore(Protocol):
    async def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``, replacing any previous version; return its location."""
        ...

    async def get(self, location: str) -> bytes: ...

    async def exists(self, location: str) -> bool: ...

    async def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        """A time-limited URL the client downloads the document from; None: ask :meth:`get`."""
        ...


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

    async def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        return None  # files on a volume: the API streams them


class S3DocumentStore(DocumentStore):
    """Documents as objects of one bucket (AWS S3 or any S3-compatible server), keys under
    ``prefix``; boto3 in a thread. Credentials come the usual boto3 way (the environment, the
    pod's IAM role). A location written by the local store (a bare key) is read as a key of this
    bucket, so moving the files over and switching the backend keeps old invoices readable."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        url_ttl: int = 300,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._url_ttl = url_ttl
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, signature_version="s3v4"),
        )

    def _key(self, location: str) -> str:
        if location.startswith("s3://"):
            bucket, _, key = location.removeprefix("s3://").partition("/")
            if bucket != self._bucket or not key:
                raise ValueError(f"document {location!r} is not in bucket {self._bucket!r}")
            return key
        if not location or ".." in PurePosixPath(location).parts or location.startswith("/"):
            raise ValueError(f"invalid document key {location!r}")
        return f"{self._prefix}/{location}" if self._prefix else location

    def _put(self, key: str, data: bytes) -> str:
        full = self._key(key)
        # One PUT: S3 replaces an object whole, so a retried render never leaves half a PDF.
        self._client.put_object(Bucket=self._bucket, Key=full, Body=data, ContentType=_media_type(full))
        return f"s3://{self._bucket}/{full}"

    def _get(self, location: str) -> bytes:
        body: bytes = self._client.get_object(Bucket=self._bucket, Key=self._key(location))["Body"].read()
        return body

    def _exists(self, location: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=self._key(location))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _url(self, location: str, filename: str, media_type: str) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self._bucket,
                "Key": self._key(location),
                "ResponseContentType": media_type,
                "ResponseContentDisposition": f'inline; filename="{filename}"',
            },
            ExpiresIn=self._url_ttl,
        )
        return url

    async def put(self, key: str, data: bytes) -> str:
        return await asyncio.to_thread(self._put, key, data)

    async def get(self, location: str) -> bytes:
        return await asyncio.to_thread(self._get, location)

    async def exists(self, location: str) -> bool:
        return await asyncio.to_thread(self._exists, location)

    async def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        return await asyncio.to_thread(self._url, location, filename, media_type)


def _media_type(key: str) -> str:
    return "application/pdf" if key.endswith(".pdf") else "application/octet-stream"


def document_store(settings: Settings) -> DocumentStore:
    """The store ``DOCUMENTS_BACKEND`` names."""
    if settings.documents_backend == "s3":
        assert settings.s3_bucket is not None  # the settings refuse s3 without a bucket
        return S3DocumentStore(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            url_ttl=settings.documents_url_ttl,
        )
    return LocalDocumentStore(settings.documents_root)


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
