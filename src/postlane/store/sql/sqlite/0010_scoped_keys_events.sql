-- Version 10: idempotency keys belong to their submitter, and a key reused with another payload
-- is told apart from a retry; mail can wait for a time and expire; and the event log.
-- postlane: foreign keys off
--
-- SQLite cannot drop a column's UNIQUE constraint, so messages is rebuilt (SQLite's documented
-- procedure: a new table, the rows copied, the old one dropped, the new one renamed, with
-- foreign keys off so deliveries keep their rows, checked before the commit).
CREATE TABLE messages_new (
    id                TEXT PRIMARY KEY,
    lane              TEXT NOT NULL,
    sender            TEXT NOT NULL,
    subject           TEXT NOT NULL,
    message_id        TEXT NOT NULL,
    idempotency_scope TEXT NOT NULL DEFAULT '', -- the key's owner (submitter; '' for local)
    idempotency_key   TEXT,
    fingerprint       TEXT,                     -- the submission's digest, when it had a key
    size              INTEGER NOT NULL,
    metadata          TEXT NOT NULL DEFAULT '{}',
    created_at        REAL NOT NULL,
    send_at           REAL,                     -- not before (NULL: at once)
    expires_at        REAL,                     -- never after (NULL: max_age decides)
    done_at           REAL,
    submitter         TEXT,
    content           BLOB NOT NULL,            -- last, so reads of the other columns stop
                                                -- before its overflow pages
    UNIQUE (idempotency_scope, idempotency_key)
);
INSERT INTO messages_new (id, lane, sender, subject, message_id, idempotency_scope,
                          idempotency_key, size, metadata, created_at, done_at, submitter,
                          content)
SELECT id, lane, sender, subject, message_id, '', idempotency_key, size, metadata, created_at,
       done_at, submitter, content
FROM messages;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_done ON messages (done_at) WHERE done_at IS NOT NULL;
CREATE INDEX messages_sender ON messages (lower(sender));

-- copied from the message, like lane: the claim and the expiry sweep read deliveries only
ALTER TABLE deliveries ADD COLUMN expires_at REAL;
CREATE INDEX deliveries_expiring ON deliveries (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('queued', 'deferred', 'held');

-- What happened to each recipient, written in the transaction of the change itself. The id is
-- the readers' cursor: one writer commits in id order, and AUTOINCREMENT never hands out an id
-- again, even after the newest rows were purged.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    type        TEXT NOT NULL,      -- queued, sent, deferred, bounced, complained, ...
    at          REAL NOT NULL,
    queue_id    TEXT NOT NULL,
    delivery_id INTEGER,
    recipient   TEXT,
    lane        TEXT NOT NULL,
    class       TEXT,
    code        INTEGER,
    enhanced    TEXT,
    text        TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}' -- the message's own, kept with its events
);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_message ON events (queue_id, id);
