-- Version 23: one entry per address, scope and reason. A hard bounce after an unsubscribe used
-- to widen the one entry of its address and scope and take its reason, so removing it later
-- (the bounce was a mistake) removed the recipient's unsubscribe with it: mail the recipient
-- had asked not to get went out again. Now each reason is an entry of its own, removed on its
-- own (suppress remove --reason); an entry widened before this version stays one entry.
-- postlane: foreign keys off
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
    lanes      TEXT,                       -- NULL: every lane; else a JSON array of lane names
    PRIMARY KEY (address, scope, reason)
);
INSERT INTO suppressions_new (address, scope, reason, created_at, expires_at, detail, source,
                              code, enhanced, text, queue_id, lanes)
SELECT address, scope, reason, created_at, expires_at, detail, source, code, enhanced, text,
       queue_id, lanes
FROM suppressions;
DROP TABLE suppressions;
ALTER TABLE suppressions_new RENAME TO suppressions;
CREATE INDEX suppressions_created ON suppressions (created_at);
