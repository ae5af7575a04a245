-- postlane schema, version 1 (SQLite).
-- Times are seconds since the epoch (REAL, UTC). Content is stored once per message.

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,           -- the queue id (sortable)
    lane            TEXT NOT NULL,
    sender          TEXT NOT NULL,              -- envelope sender
    subject         TEXT NOT NULL,
    message_id      TEXT NOT NULL,              -- the Message-ID header, fixed at enqueue
    idempotency_key TEXT UNIQUE,                -- a unique constraint, not a check-then-insert
    size            INTEGER NOT NULL,
    metadata        TEXT NOT NULL DEFAULT '{}', -- the application's free JSON
    created_at      REAL NOT NULL,
    done_at         REAL,                       -- when the last recipient reached a final state
    content         BLOB NOT NULL               -- the final MIME bytes; last, so reads of the
                                                -- other columns stop before its overflow pages
);
CREATE INDEX messages_done ON messages (done_at) WHERE done_at IS NOT NULL;

-- One row per recipient: its own state, attempts, schedule, lease and last reply.
CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY,
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
    UNIQUE (queue_id, address)
);
-- The claim index: only waiting rows are in it, so sent history does not slow claims down.
CREATE INDEX deliveries_due ON deliveries (lane, next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_leased ON deliveries (lease_expires_at) WHERE state = 'sending';
CREATE INDEX deliveries_dead ON deliveries (updated_at) WHERE state = 'dead';
-- Stats and listings by lane and state (covering for counts and oldest age).
CREATE INDEX deliveries_lane_state ON deliveries (lane, state, created_at);
CREATE INDEX deliveries_domain ON deliveries (domain, state);

-- Every try, kept with its delivery: class, code, enhanced code, text, relay, destination, time.
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at          REAL NOT NULL,
    class       TEXT NOT NULL,
    code        INTEGER,
    enhanced    TEXT,
    text        TEXT NOT NULL,
    relay       TEXT NOT NULL,
    destination TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    counted     INTEGER NOT NULL                -- 0 for throttled/connection deferrals
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);

CREATE TABLE suppressions (
    address    TEXT PRIMARY KEY,                -- lower-cased
    created_at REAL NOT NULL,
    source     TEXT NOT NULL,                   -- bounce, operator, api
    reason     TEXT,
    code       INTEGER,
    enhanced   TEXT,
    text       TEXT,
    queue_id   TEXT                              -- the message whose bounce caused it
);
