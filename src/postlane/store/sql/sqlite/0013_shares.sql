-- Version 13: a destination's limits hold for the whole fleet. Each process that sends to a
-- limited destination says how much it wants (its demand) for a short lease; each takes the
-- share of the rate and the concurrency its demand is of all live demands. A process that dies
-- stops renewing, and its share returns to the others within the lease.
CREATE TABLE destination_shares (
    destination TEXT NOT NULL,
    owner       TEXT NOT NULL,
    demand      REAL NOT NULL,
    since       REAL NOT NULL,      -- when this process first asked for it
    expires_at  REAL NOT NULL,
    PRIMARY KEY (destination, owner)
);
CREATE INDEX destination_shares_expiry ON destination_shares (expires_at);
