"""The value types every blob-store engine shares (see casd/blobstore/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

from casd.digest import Digest

# The largest piece a reader hands over at once: a download or a merge of any size holds
# about this much of a blob in memory.
READ_PIECE = 1 << 20


class BlobMissing(FileNotFoundError):
    """The store holds no blob under this digest."""


@dataclass(frozen=True)
class BlobInfo:
    """One stored object. `digest` is None when its name or place is not a blob's (fsck
    reports it); `where` names it for people (a path or an s3:// key)."""

    digest: Digest | None
    where: str
    size: int
    mtime: float = 0.0
    # Changes whenever the stored bytes may have: (inode, mtime, size) or (ETag, size).
    version: tuple = ()
    # A daemon has stored it and not yet written its row (local: the file is still its
    # locked temp file's inode). Not an orphan.
    in_flight: bool = False


@dataclass(frozen=True)
class BlobHash:
    """What one blob's bytes hash to, and the `version` of the blob that was read."""

    xxh3: str
    digest: str | None  # the real md5/sha256 hex, when asked for
    version: tuple
    size: int
