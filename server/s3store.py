"""Blobs in an S3-compatible bucket (AWS S3, Ceph RGW, Garage, SeaweedFS, MinIO),
through boto3.

``s3://BUCKET/PREFIX?endpoint=https://host:port&region=R&public_endpoint=URL&direct=1``:
objects are ``PREFIX/<user>/<inode>/<blob>`` (UUIDs only: keys reveal no names).
Credentials come from the AWS conventions (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles...), read by boto3.

Chunk bytes need not pass through the API nodes: :meth:`presign_put` and
:meth:`presign_get` give short-lived URLs for exactly one object; a PUT URL is
signed with its ``Content-Length``, so it takes exactly the size the server
recorded (and charged) for that blob. ``public_endpoint``: the address clients
use, when the API nodes reach the store by another one; ``direct=0``: chunk bytes
go through the API nodes after all (clients that cannot reach the store).
"""
from __future__ import annotations

import tempfile
from typing import AsyncIterator, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

from .errors import not_found, too_large
from .storage import BlobStore, Staged

_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_READ_CHUNK = 1024 * 1024


def _u(value: UUID) -> str:
    if not isinstance(value, UUID):
        raise TypeError("object keys are built from uuid.UUID objects only")
    return str(value)


class _S3Staged(Staged):
    """Bytes held here (in memory or a spool file) until the metadata transaction
    that records them calls commit(): an object store has no invisible rename, and
    writing the final key any earlier could overwrite a stored blob whose id a
    refused request reused."""

    def __init__(self, store: "S3BlobStore", key: str, body, size: int) -> None:
        self.store, self.key, self.body, self.size = store, key, body, size
        self.uploaded = False

    def commit(self) -> None:
        if self.uploaded:
            return
        if isinstance(self.body, bytes):
            self.store.s3.put_object(Bucket=self.store.bucket, Key=self.key, Body=self.body)
        else:
            self.body.seek(0)
            self.store.s3.upload_fileobj(self.body, self.store.bucket, self.key)
        self.uploaded = True
        self._release()

    def discard(self) -> None:
        self._release()
        if self.uploaded:
            try:
                self.store.s3.delete_object(Bucket=self.store.bucket, Key=self.key)
            except Exception:   # pragma: no cover - garbage only: no row names it
                pass

    def _release(self) -> None:
        if not isinstance(self.body, bytes):
            self.body.close()


class S3BlobStore(BlobStore):
    direct = True

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, public_endpoint: str | None = None,
                 addressing: str | None = None, direct: bool = True) -> None:
        import boto3
        from botocore.config import Config
        self.direct = direct
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        style = addressing or ("path" if endpoint else "auto")
        config = Config(signature_version="s3v4", max_pool_connections=64,
                        retries={"mode": "standard", "max_attempts": 4},
                        s3={"addressing_style": style}, connect_timeout=5, read_timeout=60)
        session = boto3.session.Session()
        self.s3 = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        # Presigning is local arithmetic: a second client only to sign for the address
        # clients use.
        self.signer = (session.client("s3", endpoint_url=public_endpoint, region_name=region, config=config)
                       if public_endpoint else self.s3)
        self._missing = (self.s3.exceptions.NoSuchKey,)

    @classmethod
    def from_url(cls, url: str) -> "S3BlobStore":
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError("an s3:// URL needs a bucket: s3://BUCKET/PREFIX")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(q) - {"endpoint", "region", "public_endpoint", "addressing", "direct"}
        if unknown:
            raise ValueError(f"unknown s3:// URL parameter(s): {', '.join(sorted(unknown))}")
        return cls(parts.netloc, parts.path, endpoint=q.get("endpoint"), region=q.get("region"),
                   public_endpoint=q.get("public_endpoint"), addressing=q.get("addressing"),
                   direct=q.get("direct", "1") not in ("0", "false", "no"))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")

    # -- keys
    def _key(self, user: UUID, inode: UUID, blob: UUID) -> str:
        return f"{self.prefix}{_u(user)}/{_u(inode)}/{_u(blob)}"

    def _keys_under(self, prefix: str) -> Iterator[str]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                yield obj["Key"]

    def _delete_keys(self, keys: Iterable[str]) -> None:
        batch: list[dict] = []
        for key in keys:
            batch.append({"Key": key})
            if len(batch) == 1000:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                batch = []
        if batch:
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # -- writes (through an API node: the fallback for clients without direct transfers)
    async def stage_stream(self, user, inode, blob, chunks: AsyncIterator[bytes], max_bytes) -> Staged:
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        try:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(f"blob larger than {max_bytes} bytes")
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        return _S3Staged(self, self._key(user, inode, blob), spool, size)

    def stage_bytes(self, user, inode, blob, data) -> Staged:
        return _S3Staged(self, self._key(user, inode, blob), data, len(data))

    # -- reads
    def open_range(self, user, inode, blob, start, end) -> Iterator[bytes]:
        if end <= start:
            return iter(())
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(user, inode, blob),
                                     Range=f"bytes={start}-{end - 1}")
        except self._missing:
            raise not_found("blob not found") from None
        return obj["Body"].iter_chunks(_READ_CHUNK)

    def copy_blob(self, user, inode, blob, to) -> None:
        try:
            self.s3.copy_object(Bucket=self.bucket, Key=self._key(user, to, blob),
                                CopySource={"Bucket": self.bucket, "Key": self._key(user, inode, blob)})
        except self.s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise not_found("blob not found") from None
            raise

    def sizes(self, user, inode) -> dict[UUID, int]:
        start = f"{self.prefix}{_u(user)}/{_u(inode)}/"
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", ()):
                try:
                    out[UUID(obj["Key"][len(start):])] = obj["Size"]
                except ValueError:
                    continue
        return out

    def list_blobs(self, user=None):
        start = self.prefix + (_u(user) + "/" if user is not None else "")
        for key in self._keys_under(start):
            parts = key[len(self.prefix):].split("/")
            try:
                yield UUID(parts[0]), UUID(parts[1]), UUID(parts[2])
            except (IndexError, ValueError):
                continue

    # -- direct transfers
    def presign_put(self, user, inode, blob, size, ttl) -> str:
        return self.signer.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._key(user, inode, blob),
                                  "ContentLength": size}, ExpiresIn=ttl)

    def presign_get(self, user, inode, blob, ttl) -> str:
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(user, inode, blob)}, ExpiresIn=ttl)

    # -- deletes
    def delete_blobs(self, user, inode, blobs) -> None:
        self._delete_keys(self._key(user, inode, b) for b in blobs)

    def delete_inode(self, user, inode) -> None:
        self._delete_keys(list(self._keys_under(f"{self.prefix}{_u(user)}/{_u(inode)}/")))

    def delete_user(self, user) -> None:
        self._delete_keys(list(self._keys_under(f"{self.prefix}{_u(user)}/")))
