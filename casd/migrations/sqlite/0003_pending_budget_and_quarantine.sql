-- casd catalogue, version 3: who holds each pending upload (for the pending-manifest budget),
-- and chunks quarantined by `casd fsck --repair`.

-- The client that created the upload: "addr:<remote address>", or "token:<fingerprint>" when
-- the daemon requires a token. Uploads made before this version belong to ''.
ALTER TABLE uploads ADD COLUMN client TEXT NOT NULL DEFAULT '';
-- The budget sums the chunk entries of live pending uploads, per client and in total, on
-- every new handshake: only pending rows are indexed, merged ones (kept 24 h) are not read.
CREATE INDEX uploads_pending_by_client ON uploads (client, expires_at, manifest_id)
    WHERE state = 'pending';

-- chunks.state 2: quarantined. fsck --repair moved the blob to quarantine/ because its bytes
-- were wrong or gone; the chunk is absent (handshakes list it missing, a PUT stores it again)
-- and the files that use it are damaged until then. Few rows ever have it: a partial index
-- makes "does this file use a quarantined chunk?" cost nothing on a healthy store.
CREATE INDEX chunks_quarantined ON chunks (digest) WHERE state = 2;
