-- casd catalogue, version 1.
-- A hex digest's length names its algorithm (md5: 32, sha256: 64), so a digest string alone
-- is unique across algorithms; algo is kept beside it to say so explicitly.

-- One row per stored blob. state 0: live (the blob file is in place and may be relied on);
-- state 1: being collected by gc (treated as absent; the file may or may not still exist).
CREATE TABLE chunks (
    digest  TEXT    NOT NULL PRIMARY KEY,
    algo    TEXT    NOT NULL,
    size    INTEGER NOT NULL,
    xxh3    TEXT    NOT NULL,
    created REAL    NOT NULL,
    state   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- What a file is made of. Shared by the upload that built it and the file it became.
CREATE TABLE manifests (
    id          INTEGER PRIMARY KEY,
    algo        TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    chunks_key  TEXT    NOT NULL,  -- xxh3-128 of the ordered chunk list
    chunk_count INTEGER NOT NULL,
    created     REAL    NOT NULL
);
CREATE INDEX manifests_by_content ON manifests (digest, size, chunks_key);

CREATE TABLE manifest_chunks (
    manifest_id INTEGER NOT NULL REFERENCES manifests (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (manifest_id, seq)
) WITHOUT ROWID;
-- gc asks "does anything still reference this digest?"
CREATE INDEX manifest_chunks_by_digest ON manifest_chunks (digest);

-- state 'pending' until merged; a merged upload is kept (state 'merged') until it expires so a
-- repeated merge answers the same.
CREATE TABLE uploads (
    id          TEXT    NOT NULL PRIMARY KEY,
    manifest_id INTEGER NOT NULL REFERENCES manifests (id),
    ext         TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending',
    created     REAL    NOT NULL,
    expires_at  REAL    NOT NULL
) WITHOUT ROWID;
CREATE INDEX uploads_by_manifest ON uploads (manifest_id);
CREATE INDEX uploads_by_expiry ON uploads (expires_at);

CREATE TABLE files (
    digest      TEXT    NOT NULL PRIMARY KEY,
    algo        TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    manifest_id INTEGER NOT NULL REFERENCES manifests (id),
    ext         TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    created     REAL    NOT NULL
) WITHOUT ROWID;
CREATE INDEX files_by_manifest ON files (manifest_id);
