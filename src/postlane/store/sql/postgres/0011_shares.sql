-- Version 11: a destination's limits hold for the whole fleet. Each process that sends to a
-- limited destination says how much it wants (its demand) for a short lease; each takes the
-- share of the rate and the concurrency its demand is of all live demands. A process that dies
-- stops renewing, and its share returns to the others within the lease.
CREATE TABLE destination_shares (
    destination text NOT NULL,
    owner       text NOT NULL,
    demand      double precision NOT NULL,
    since       double precision NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (destination, owner)
);
CREATE INDEX destination_shares_expiry ON destination_shares (expires_at);
