-- Webhook events waiting for delivery, one row per event and receiver URL. Delivered rows are
-- deleted; rows are sent in id order per URL, so events of one file arrive in order.
CREATE TABLE hook_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX hook_events_url ON hook_events (url, id);
