-- Version 3: dead letters that an operator requeued, for the recovery-time metric.
CREATE TABLE dead_letter_recoveries (
    id           INTEGER PRIMARY KEY,
    queue_id     TEXT NOT NULL,
    address      TEXT NOT NULL,
    class        TEXT,
    dead_at      REAL NOT NULL,
    requeued_at  REAL NOT NULL
);
CREATE INDEX dead_letter_recoveries_requeued ON dead_letter_recoveries (requeued_at);
