-- casd catalogue on PostgreSQL, version 2: tenants, as SQLite's migration 0005 (docs/tenants.md).
-- Without `casd serve --tokens` these tables stay empty and no query of the daemon's hot path
-- reads them.

-- Which tenant owns which complete file, under the name and ext it uploaded it with. A
-- `files` row stays while at least one tenant owns it; deleting the last ownership deletes
-- the file row too, and gc then frees its chunks as before. `size` is the file's, kept here
-- so a tenant's usage is one indexed sum.
CREATE TABLE tenant_files (
    tenant  TEXT             NOT NULL,
    digest  TEXT             NOT NULL,
    size    BIGINT           NOT NULL,
    ext     TEXT             NOT NULL,
    name    TEXT             NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, digest)
);
CREATE INDEX tenant_files_by_digest ON tenant_files (digest);

-- Proofs of possession: the tenant sent these chunk bytes (verified), or merged a file made
-- of them. A handshake leaves a chunk out of `missing` only for a tenant that proved it.
CREATE TABLE tenant_chunks (
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (tenant, digest)
);
CREATE INDEX tenant_chunks_by_digest ON tenant_chunks (digest);

-- The tenant an upload belongs to ('' without tenants): another tenant's upload id is 404.
ALTER TABLE uploads ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
-- A tenant's pending bytes, for its quota, on every new handshake of that tenant.
CREATE INDEX uploads_pending_by_tenant ON uploads (tenant, expires_at, manifest_id)
    WHERE state = 'pending';
