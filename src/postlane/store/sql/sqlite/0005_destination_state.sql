-- Version 5: per-destination throttle state that outlives a process and is seen by every
-- process: pauses (with why), and the rate allowed after a slow-down.
CREATE TABLE destination_state (
    destination  TEXT PRIMARY KEY,
    rate         REAL,            -- messages/s allowed now; NULL: no limit
    paused_until REAL,            -- NULL: not paused
    reason       TEXT,
    updated_at   REAL NOT NULL
);
