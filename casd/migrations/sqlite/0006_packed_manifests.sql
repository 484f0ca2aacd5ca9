-- casd catalogue, version 6: a manifest's chunk list is stored packed (casd/catalog/packed.py)
-- instead of a row per chunk: a 200,000-chunk handshake wrote 200,000 rows and as many index
-- entries before it could answer.

-- The list in parts of up to 2048 consecutive chunks: the position of the part's first
-- chunk, its digests' raw bytes back to back, its sizes as big-endian 64-bit integers.
CREATE TABLE manifest_parts (
    manifest_id INTEGER NOT NULL,
    start       INTEGER NOT NULL,
    digests     BLOB    NOT NULL,
    sizes       BLOB    NOT NULL,
    PRIMARY KEY (manifest_id, start)
);

-- Each digest a manifest uses, once, with the size it gives it: what the missing list, the
-- size check of a chunk PUT, gc ("does anything still reference this digest?") and fsck ask.
CREATE TABLE manifest_digests (
    manifest_id INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (manifest_id, digest)
) WITHOUT ROWID;
CREATE INDEX manifest_digests_by_digest ON manifest_digests (digest);

-- Both go with their manifest (what ON DELETE CASCADE did for manifest_chunks, without a
-- foreign key check per inserted row).
CREATE TRIGGER manifests_drop_lists AFTER DELETE ON manifests BEGIN
    DELETE FROM manifest_parts WHERE manifest_id = OLD.id;
    DELETE FROM manifest_digests WHERE manifest_id = OLD.id;
END;

-- The existing lists are converted (casd.catalog.sqlite._pack_existing_manifests packs the
-- parts, in Python: this SQLite may lack unhex()), then the old table goes.
INSERT INTO manifest_digests (manifest_id, digest, size)
    SELECT manifest_id, digest, min(size) FROM manifest_chunks GROUP BY manifest_id, digest;
