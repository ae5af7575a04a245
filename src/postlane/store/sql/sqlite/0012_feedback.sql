-- Version 12: hearing back after the first hop, and telling the application.
-- postlane: foreign keys off
--
-- Suppressions gain a scope (every sender, or one sender domain), an expiry, a reason from a
-- closed set (hard_bounce, complaint, unsubscribe, manual) and a free detail. The primary key
-- becomes (address, scope), so suppressions is rebuilt; rows that came from a bounce keep their
-- reply, an operator's reason becomes the detail of a 'manual' entry.
CREATE TABLE suppressions_new (
    address    TEXT NOT NULL,              -- lower-cased
    scope      TEXT NOT NULL DEFAULT '*',  -- '*' (every sender) or a sender domain
    reason     TEXT NOT NULL,              -- hard_bounce, complaint, unsubscribe, manual
    created_at REAL NOT NULL,
    expires_at REAL,                       -- NULL: never
    detail     TEXT,
    source     TEXT NOT NULL,              -- bounce, dsn, arf, webhook:ses, unsubscribe, operator
    code       INTEGER,
    enhanced   TEXT,
    text       TEXT,
    queue_id   TEXT,                       -- the message whose bounce or complaint caused it
    PRIMARY KEY (address, scope)
);
INSERT INTO suppressions_new (address, scope, reason, created_at, detail, source, code,
                              enhanced, text, queue_id)
SELECT address, '*', CASE WHEN source = 'bounce' THEN 'hard_bounce' ELSE 'manual' END,
       created_at, CASE WHEN source = 'bounce' THEN text ELSE reason END, source, code,
       enhanced, text, queue_id
FROM suppressions;
DROP TABLE suppressions;
ALTER TABLE suppressions_new RENAME TO suppressions;
CREATE INDEX suppressions_created ON suppressions (created_at);

-- What arrived at the bounce listener or a webhook and matched no recipient, or could not be
-- read: kept for the operator, never dropped, never an error.
CREATE TABLE feedback_unmatched (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,             -- bounce listener, webhook:ses, ...
    kind        TEXT NOT NULL,             -- dsn, arf, plain, auto-reply, event, unreadable
    reason      TEXT NOT NULL,             -- why nothing matched
    mail_from   TEXT,
    rcpt_to     TEXT,
    content     BLOB NOT NULL              -- the message or payload as received (bounded)
);
CREATE INDEX feedback_unmatched_received ON feedback_unmatched (received_at);

-- Keys postlane generates once and every process shares (VERP and unsubscribe tokens).
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    created_at REAL NOT NULL
);

-- Each outbound webhook endpoint follows the event log with its own cursor; one process at a
-- time sends to it (a lease, as deliveries have).
CREATE TABLE webhook_endpoints (
    name             TEXT PRIMARY KEY,
    cursor           INTEGER NOT NULL,     -- the last event acknowledged (0: none yet)
    failures         INTEGER NOT NULL DEFAULT 0,  -- in a row
    paused_until     REAL,
    last_error       TEXT,
    last_error_at    REAL,
    last_success_at  REAL,
    delivered        INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at REAL,
    updated_at       REAL NOT NULL
);

-- A bounce that quotes the original's headers names it by its Message-ID.
CREATE INDEX messages_message_id ON messages (message_id);
