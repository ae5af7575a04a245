-- Version 25: a delivery's id is never given to another delivery. A VERP return path and a
-- one-click unsubscribe link name a delivery by its id (postlane.feedback.tokens); without
-- AUTOINCREMENT, SQLite handed the highest ids out again once their rows were deleted (a
-- message cancelled, deleted or purged), so a token for a deleted delivery named whichever
-- recipient came next: a send token could cancel its own deferred message and, with the tokens
-- its own mail server had seen, unsubscribe or hard-bounce (suppress for every sender) another
-- tenant's recipient. PostgreSQL's identity columns never hand an id out twice.
-- postlane: foreign keys off
--
-- SQLite cannot add AUTOINCREMENT to a table: deliveries is rebuilt (SQLite's documented
-- procedure, as version 10 did for messages), its columns and indexes as they are.
CREATE TABLE deliveries_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id         TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address          TEXT NOT NULL,
    domain           TEXT NOT NULL,
    destination      TEXT NOT NULL,
    lane             TEXT NOT NULL,             -- copied from the message for the claim index
    created_at       REAL NOT NULL,             -- copied from the message, for age queries
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    deferrals        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    lease_owner      TEXT,
    lease_expires_at REAL,
    hold_after       INTEGER NOT NULL DEFAULT 0, -- held by an operator while being sent
    last_code        INTEGER,
    last_enhanced    TEXT,
    last_text        TEXT,
    last_class       TEXT,
    reason           TEXT,                       -- why the queue decided its last transition
    updated_at       REAL NOT NULL,
    dead_since       REAL,
    expires_at       REAL,
    UNIQUE (queue_id, address)
);
INSERT INTO deliveries_new (id, queue_id, address, domain, destination, lane, created_at, state,
                            attempts, deferrals, next_attempt_at, lease_owner, lease_expires_at,
                            hold_after, last_code, last_enhanced, last_text, last_class, reason,
                            updated_at, dead_since, expires_at)
SELECT id, queue_id, address, domain, destination, lane, created_at, state, attempts, deferrals,
       next_attempt_at, lease_owner, lease_expires_at, hold_after, last_code, last_enhanced,
       last_text, last_class, reason, updated_at, dead_since, expires_at
FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_new RENAME TO deliveries;
CREATE INDEX deliveries_due ON deliveries (lane, next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_leased ON deliveries (lease_expires_at) WHERE state = 'sending';
CREATE INDEX deliveries_dead ON deliveries (updated_at) WHERE state = 'dead';
CREATE INDEX deliveries_lane_state ON deliveries (lane, state, created_at);
CREATE INDEX deliveries_domain ON deliveries (domain, state);
CREATE INDEX deliveries_destination ON deliveries (destination, state);
CREATE INDEX deliveries_sent_at ON deliveries (updated_at) WHERE state = 'sent';
CREATE INDEX deliveries_address ON deliveries (lower(address));
CREATE INDEX deliveries_expiring ON deliveries (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('queued', 'deferred', 'held');
-- ids given out before, whose rows are gone since (their tokens may still be out there): the
-- events still name them; the next id comes after every one of them
INSERT INTO sqlite_sequence (name, seq)
SELECT 'deliveries', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'deliveries');
UPDATE sqlite_sequence
SET seq = max(seq, (SELECT coalesce(max(id), 0) FROM deliveries),
              (SELECT coalesce(max(delivery_id), 0) FROM events))
WHERE name = 'deliveries';
