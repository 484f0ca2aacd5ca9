-- casd catalogue on PostgreSQL, version 3: a manifest's chunk list stored packed, as SQLite's
-- migration 0006 (casd/catalog/packed.py): parts of up to 2048 consecutive chunks (digests'
-- raw bytes back to back, sizes as big-endian 64-bit integers) and each digest a manifest
-- uses once, with its size, instead of a row per chunk.

CREATE TABLE manifest_parts (
    manifest_id BIGINT  NOT NULL,
    start       INTEGER NOT NULL,
    digests     BYTEA   NOT NULL,
    sizes       BYTEA   NOT NULL,
    PRIMARY KEY (manifest_id, start)
);

CREATE TABLE manifest_digests (
    manifest_id BIGINT NOT NULL,
    digest      TEXT   NOT NULL,
    size        BIGINT NOT NULL,
    PRIMARY KEY (manifest_id, digest)
);
-- gc asks "does anything still reference this digest?"
CREATE INDEX manifest_digests_by_digest ON manifest_digests (digest);

-- Both go with their manifest (what ON DELETE CASCADE did for manifest_chunks, without a
-- foreign key check per inserted row).
CREATE FUNCTION casd_drop_manifest_lists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM manifest_parts WHERE manifest_id = OLD.id;
    DELETE FROM manifest_digests WHERE manifest_id = OLD.id;
    RETURN OLD;
END
$$;
CREATE TRIGGER manifests_drop_lists AFTER DELETE ON manifests
    FOR EACH ROW EXECUTE FUNCTION casd_drop_manifest_lists();

-- The existing lists, converted in place (positions are seq, 0..n-1, as before).
INSERT INTO manifest_parts (manifest_id, start, digests, sizes)
    SELECT manifest_id, (seq / 2048) * 2048,
           string_agg(decode(digest, 'hex'), ''::bytea ORDER BY seq),
           string_agg(int8send(size), ''::bytea ORDER BY seq)
    FROM manifest_chunks GROUP BY manifest_id, seq / 2048;
INSERT INTO manifest_digests (manifest_id, digest, size)
    SELECT manifest_id, digest, min(size) FROM manifest_chunks GROUP BY manifest_id, digest;
DROP TABLE manifest_chunks;
