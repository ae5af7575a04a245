-- Version 3: per-destination throttle state that outlives a process and is seen by every
-- process on every host: pauses (with why), and the rate allowed after a slow-down.
CREATE TABLE destination_state (
    destination  text PRIMARY KEY,
    rate         double precision,  -- messages/s allowed now; NULL: no limit
    paused_until double precision,  -- NULL: not paused
    reason       text,
    updated_at   double precision NOT NULL
);
