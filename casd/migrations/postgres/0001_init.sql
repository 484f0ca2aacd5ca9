-- casd catalogue on PostgreSQL, version 1: the schema the SQLite catalogue has after its
-- migration 0004, table for table and index for index (casd/migrations/sqlite).
-- A hex digest's length names its algorithm (md5: 32, sha256: 64); algo says so explicitly.

-- One row per stored blob. state 0: live (the blob is in the store and may be relied on);
-- 1: being collected by gc (absent); 2: quarantined by fsck --repair (absent, kept so the
-- files using it can be told damaged).
CREATE TABLE chunks (
    digest  TEXT             NOT NULL PRIMARY KEY,
    algo    TEXT             NOT NULL,
    size    BIGINT           NOT NULL,
    xxh3    TEXT             NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    state   SMALLINT         NOT NULL DEFAULT 0
);
-- Few rows are ever quarantined: "does this file use a quarantined chunk?" costs nothing.
CREATE INDEX chunks_quarantined ON chunks (digest) WHERE state = 2;

-- What a file is made of. Ids come from an identity sequence and are never reused (a
-- download holding an old id must never find another manifest's chunks under it).
CREATE TABLE manifests (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    algo        TEXT             NOT NULL,
    digest      TEXT             NOT NULL,
    size        BIGINT           NOT NULL,
    chunks_key  TEXT             NOT NULL,  -- xxh3-128 of the ordered chunk list
    chunk_count INTEGER          NOT NULL,
    created     DOUBLE PRECISION NOT NULL
);
CREATE INDEX manifests_by_content ON manifests (digest, size, chunks_key);

CREATE TABLE manifest_chunks (
    manifest_id BIGINT  NOT NULL REFERENCES manifests (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    PRIMARY KEY (manifest_id, seq)
);
-- gc asks "does anything still reference this digest?"
CREATE INDEX manifest_chunks_by_digest ON manifest_chunks (digest);

-- state 'pending' until merged; a merged upload is kept until it expires so a repeated merge
-- answers the same. client: who holds it, for the pending-manifest budget.
CREATE TABLE uploads (
    id          TEXT             NOT NULL PRIMARY KEY,
    manifest_id BIGINT           NOT NULL REFERENCES manifests (id),
    ext         TEXT             NOT NULL,
    name        TEXT             NOT NULL,
    state       TEXT             NOT NULL DEFAULT 'pending',
    created     DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    client      TEXT             NOT NULL DEFAULT ''
);
CREATE INDEX uploads_by_manifest ON uploads (manifest_id);
CREATE INDEX uploads_by_expiry ON uploads (expires_at);
CREATE INDEX uploads_pending_by_client ON uploads (client, expires_at, manifest_id)
    WHERE state = 'pending';

CREATE TABLE files (
    digest      TEXT             NOT NULL PRIMARY KEY,
    algo        TEXT             NOT NULL,
    size        BIGINT           NOT NULL,
    manifest_id BIGINT           NOT NULL REFERENCES manifests (id),
    ext         TEXT             NOT NULL,
    name        TEXT             NOT NULL,
    created     DOUBLE PRECISION NOT NULL
);
CREATE INDEX files_by_manifest ON files (manifest_id);

-- Webhook events waiting for delivery, one row per event and receiver URL.
CREATE TABLE hook_events (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url     TEXT             NOT NULL,
    kind    TEXT             NOT NULL,
    body    TEXT             NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX hook_events_url ON hook_events (url, id);
