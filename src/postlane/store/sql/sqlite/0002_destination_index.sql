-- Version 2: find a destination's deliveries by state (pauses, flushes and per-destination
-- views walk this instead of the whole table).
CREATE INDEX deliveries_destination ON deliveries (destination, state);
