-- Version 6: a compact recorded history for `postlane alerts` and the dashboard: one row per
-- minute and lane (queue-wide events and paused destinations under lane '*'); and the state of
-- each alert, so a firing or a resolution is notified once, by one process.
CREATE TABLE metric_samples (
    at           REAL NOT NULL,     -- the start of the minute
    lane         TEXT NOT NULL,     -- high, normal, low; '*' for the queue-wide row
    ready        INTEGER NOT NULL DEFAULT 0,
    deferred     INTEGER NOT NULL DEFAULT 0,
    held         INTEGER NOT NULL DEFAULT 0,
    sending      INTEGER NOT NULL DEFAULT 0,
    oldest_age   REAL NOT NULL DEFAULT 0,
    sent         INTEGER NOT NULL DEFAULT 0,   -- events during the previous minute ('*' row)
    dead         INTEGER NOT NULL DEFAULT 0,
    hard_bounces INTEGER NOT NULL DEFAULT 0,
    paused       TEXT NOT NULL DEFAULT '[]',   -- JSON list of paused destinations ('*' row)
    PRIMARY KEY (at, lane)
);

CREATE TABLE alert_state (
    name        TEXT PRIMARY KEY,   -- the alert with its labels, e.g. OldestAgeGrowing{lane=low}
    firing      INTEGER NOT NULL,
    since       REAL NOT NULL,
    updated_at  REAL NOT NULL
);

-- Deliveries that finished, by when (the events of a minute are counted from these).
CREATE INDEX deliveries_sent_at ON deliveries (updated_at) WHERE state = 'sent';
