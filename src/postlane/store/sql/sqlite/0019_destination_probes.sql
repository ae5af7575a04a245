-- Version 19: one probe for the fleet when a destination's pause ends. The first process to ask
-- at the end of a pause probes; the others wait for its answer (the destination opened, or the
-- longer pause its failure recorded) instead of each sending a probe of its own.
CREATE TABLE destination_probes (
    destination TEXT PRIMARY KEY,
    pause_end   REAL NOT NULL,      -- the end of the pause the probe follows
    owner       TEXT NOT NULL,      -- the process probing (its lease owner id)
    started_at  REAL NOT NULL,
    outcome     TEXT                -- NULL: under way; 'open', 'failed'
);
