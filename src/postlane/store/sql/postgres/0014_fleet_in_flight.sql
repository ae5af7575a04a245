-- Version 14: each process's sends in flight to a destination whose concurrency the fleet
-- shares, counted in the store when each send starts and ends, so that the cap holds for all
-- processes together at every moment, not only once their shares have settled.
ALTER TABLE destination_shares ADD COLUMN in_flight integer NOT NULL DEFAULT 0;
