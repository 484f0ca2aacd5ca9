"""The S3 blob store: objects at PREFIX/<algo>/<hex> in one bucket of any S3-compatible service.

Credentials and region come from where every AWS tool reads them (environment, shared
config and credentials files, profiles, instance roles); the endpoint from --s3-endpoint.
Every chunk is sent with its digest as the store's transit checksum (`Content-MD5` for md5,
`x-amz-checksum-sha256` for sha256), so a body damaged on the way is refused by the store,
and a publish returns only once the store acknowledged it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, Self

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from casd.blobstore import feed_each, hash_blob
from casd.blobstore.base import READ_PIECE, BlobHash, BlobInfo, BlobMissing
from casd.blobstore.local import (
    TempBlob,
    TempFiles,
    drop_export_temp,
    finish_export,
    open_export_temp,
    write_all,
)
from casd.digest import Algo, Digest
from casd.errors import StoreUnavailable

# Bounded waits: a store that is down or stalls turns into StoreUnavailable (503) within
# seconds rather than holding requests; botocore retries throttling and 5xx answers itself.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# Retries after the first attempt, with botocore's jittered exponential back-off (about 3.5 s
# in all). AWS_MAX_ATTEMPTS, the total number of attempts as every AWS SDK reads it, replaces
# it: a shorter budget answers 503 sooner when the store is down.
MAX_ATTEMPTS = 3
QUARANTINE = "quarantine"
# Answers that mean "no such object" (HEAD gives a bare 404).
_MISSING = {"404", "NoSuchKey", "NotFound"}
# S3BlobStore has a method named `list`, which `list[...]` in its body would mean.
_list = list


def client_config() -> Config:
    retries: dict[str, Any] = {"mode": "standard"}
    # An explicit max_attempts would override the environment; left out, botocore reads it.
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = MAX_ATTEMPTS
    return Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries=retries,
        # The checksum casd sends is the chunk's own digest; botocore adds none of its own.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Over https the transit checksum covers the body; no second pass to sign it.
        s3={"payload_signing_enabled": False},
    )


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


class S3BlobStore(TempFiles):
    """Blobs as objects; temp files stay local under tmp_dir (see the package docstring)."""

    quick_rehash = False

    def __init__(self, bucket: str, prefix: str, tmp_dir: Path, endpoint: str | None = None):
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.tmp_dir = tmp_dir
        self.endpoint = endpoint
        self.location = f"s3://{bucket}/{prefix}" + (f" at {endpoint}" if endpoint else "")
        self.quarantine_location = f"s3://{bucket}/{self.prefix}{QUARANTINE}/"
        self._stack: AsyncExitStack | None = None
        # The aiobotocore S3 client, set by start(); aiobotocore ships no type information.
        self._client: Any = None

    # -- lifecycle --

    async def start(self) -> None:
        """Open the client and check that the bucket answers; StoreUnavailable if not."""
        await asyncio.to_thread(self.tmp_dir.mkdir, parents=True, exist_ok=True)
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client("s3", endpoint_url=self.endpoint, config=client_config())
        )
        self._stack = stack
        try:
            async with self._errors("reach the bucket"):
                try:
                    await self._client.head_bucket(Bucket=self.bucket)
                except ClientError as exc:
                    if _missing(exc):
                        raise StoreUnavailable(
                            f"the blob store {self.location} has no bucket {self.bucket!r}"
                        ) from None
                    raise
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def ping(self) -> None:
        async with self._errors("reach the bucket"):
            await self._client.head_bucket(Bucket=self.bucket)

    @asynccontextmanager
    async def _errors(self, what: str):
        """Turn what the store or the network says into StoreUnavailable."""
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StoreUnavailable(
                f"the blob store {self.location} refused to {what}: {status}"
                f" {err.get('Code')} {err.get('Message', '')}".rstrip()
            ) from exc
        except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"the blob store {self.location} did not answer ({what}): {exc}"
            ) from exc

    def key(self, digest: Digest) -> str:
        return f"{self.prefix}{digest.algo.value}/{digest.hex}"

    # -- blobs --

    async def _put(self, path: Path, digest: Digest, checksum: Digest | None = None) -> None:
        """PUT the file at `path` as `digest`'s object, with `checksum` (default: the digest
        itself) as the transit checksum the store verifies before it acknowledges."""
        check = checksum or digest
        raw = base64.b64encode(bytes.fromhex(check.hex)).decode()
        extra = {"ContentMD5": raw} if check.algo is Algo.MD5 else {"ChecksumSHA256": raw}
        # aiohttp reads a file body on its executor, in pieces: no chunk is held in memory.
        f = await asyncio.to_thread(open, path, "rb")
        try:
            async with self._errors(f"store {digest.hex}"):
                await self._client.put_object(
                    Bucket=self.bucket, Key=self.key(digest), Body=f, **extra
                )
        finally:
            f.close()

    async def publish(self, temp: TempBlob, digest: Digest) -> None:
        await self._put(temp.path, digest)

    async def ensure_stored(self, temp: TempBlob, digest: Digest) -> None:
        if await self.stat(digest) is None:
            await self._put(temp.path, digest)

    async def replace(self, temp: TempBlob, digest: Digest) -> None:
        await self._put(temp.path, digest)

    async def _head(self, key: str, what: str) -> dict | None:
        async with self._errors(what):
            try:
                return await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise

    async def stat(self, digest: Digest) -> BlobInfo | None:
        key = self.key(digest)
        head = await self._head(key, f"look up {digest.hex}")
        if head is None:
            return None
        return BlobInfo(
            digest,
            f"s3://{self.bucket}/{key}",
            head["ContentLength"],
            head["LastModified"].timestamp(),
            (head.get("ETag"), head["ContentLength"]),
        )

    async def open(self, digest: Digest) -> S3Reader:
        info = await self.stat(digest)
        if info is None:
            raise BlobMissing(f"no blob {digest.algo.value} {digest.hex}")
        return S3Reader(self, self.key(digest), info.size, info.version)

    async def feed_run(self, algo: Algo, run, sink, executor=None) -> list[int]:
        return await feed_each(self, algo, run, sink, executor)

    async def delete(self, digest: Digest) -> bool:
        if await self.stat(digest) is None:
            return False
        async with self._errors(f"delete {digest.hex}"):
            await self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        return True

    async def delete_if_older(self, digest: Digest, before: float) -> bool:
        info = await self.stat(digest)
        if info is None or info.mtime >= before:
            return False
        async with self._errors(f"delete {digest.hex}"):
            await self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        return True

    async def list(self) -> AsyncIterator[BlobInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix)
        async with self._errors("list the blobs"):
            async for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    rest = key[len(self.prefix) :]
                    if rest.startswith(QUARANTINE + "/"):
                        continue
                    yield BlobInfo(
                        _digest_of(rest),
                        f"s3://{self.bucket}/{key}",
                        obj["Size"],
                        obj["LastModified"].timestamp(),
                    )

    async def quarantine(self, digest: Digest) -> str | None:
        """Copy to PREFIX/quarantine/<algo>-<hex>-<time>, then delete the blob."""
        if await self.stat(digest) is None:
            return None
        dest = f"{self.prefix}{QUARANTINE}/{digest.algo.value}-{digest.hex}-{int(time.time())}"
        async with self._errors(f"quarantine {digest.hex}"):
            await self._client.copy_object(
                Bucket=self.bucket,
                Key=dest,
                CopySource={"Bucket": self.bucket, "Key": self.key(digest)},
            )
            await self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        return f"s3://{self.bucket}/{dest}"

    async def hash_blobs(
        self, items: _list[tuple[Digest, Algo | None]], workers: int
    ) -> _list[BlobHash | OSError]:
        """Objects are read by ranged GETs and hashed on the default executor; a blob
        gone meanwhile gives BlobMissing."""
        turns = asyncio.Semaphore(workers)

        async def one(digest: Digest, algo: Algo | None) -> BlobHash | OSError:
            async with turns:
                try:
                    return await hash_blob(self, digest, algo)
                except BlobMissing as exc:
                    return exc

        out: _list[BlobHash | OSError] = []
        for i in range(0, len(items), 1000):  # bounded: a million blobs are not a million tasks
            out += await asyncio.gather(*(one(d, a) for d, a in items[i : i + 1000]))
        return out

    async def assemble(self, parts: _list[tuple[Digest, int]], dest: Path, total: int) -> None:
        loop = asyncio.get_running_loop()
        fd, temp = await asyncio.to_thread(open_export_temp, dest)
        try:
            for digest, size in parts:
                async with await self.open(digest) as reader:
                    if reader.size != size:
                        raise ValueError(
                            f"chunk {digest.hex} has {reader.size} bytes, the manifest says {size}"
                        )
                    got = 0
                    async for piece in reader.stream(0, size):
                        await loop.run_in_executor(None, write_all, fd, piece)
                        got += len(piece)
                    if got != size:
                        raise ValueError(f"chunk {digest.hex} ended {size - got} bytes early")
        except BaseException:
            await asyncio.to_thread(drop_export_temp, fd, temp)
            raise
        await asyncio.to_thread(finish_export, fd, temp, dest, total)


def _digest_of(name: str) -> Digest | None:
    """The digest an object name <algo>/<hex> stands for; None for any other name."""
    algo_name, _, hex_ = name.partition("/")
    for algo in Algo:
        if algo.value == algo_name:
            try:
                parsed = algo.parse_hex(hex_)
            except ValueError:
                return None
            return Digest(algo, parsed) if parsed == hex_ else None
    return None


class S3Reader:
    """One object, read by ranged GETs streamed in pieces (see BlobReader)."""

    file: BinaryIO | None = None  # the bytes come over the network

    def __init__(self, store: S3BlobStore, key: str, size: int, version: tuple = ()):
        self._store = store
        self._key = key
        self.size = size
        self.version = version

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        length = min(length, self.size - offset)
        if length <= 0:
            return
        store = self._store
        async with store._errors(f"read {self._key}"):
            try:
                resp = await store._client.get_object(
                    Bucket=store.bucket,
                    Key=self._key,
                    Range=f"bytes={offset}-{offset + length - 1}",
                )
            except ClientError as exc:
                if _missing(exc):
                    return  # collected meanwhile: a short read, which the caller reports
                raise
            async with resp["Body"] as body:
                while True:
                    piece = await body.read(READ_PIECE)
                    if not piece:
                        return
                    yield piece

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        pass
