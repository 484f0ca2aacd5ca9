-- casd catalogue, version 2: manifest ids are never reused.
-- Without AUTOINCREMENT SQLite hands out max(id)+1, so deleting the newest manifest and
-- starting another gives the new one the old id, and anything still holding the old id (a
-- download that read a file row a moment earlier) would find the new manifest's chunks.
-- SQLite cannot add AUTOINCREMENT to a table, so it is rebuilt (the runner turns foreign key
-- enforcement off around this and checks every reference before committing).

CREATE TABLE manifests_v2 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    algo        TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    chunks_key  TEXT    NOT NULL,  -- xxh3-128 of the ordered chunk list
    chunk_count INTEGER NOT NULL,
    created     REAL    NOT NULL
);
INSERT INTO manifests_v2 (id, algo, digest, size, chunks_key, chunk_count, created)
    SELECT id, algo, digest, size, chunks_key, chunk_count, created FROM manifests;
DROP TABLE manifests;
ALTER TABLE manifests_v2 RENAME TO manifests;
CREATE INDEX manifests_by_content ON manifests (digest, size, chunks_key);
