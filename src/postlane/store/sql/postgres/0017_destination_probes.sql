-- Version 17: one probe for the fleet when a destination's pause ends. The first process to ask
-- at the end of a pause probes; the others wait for its answer (the destination opened, or the
-- longer pause its failure recorded) instead of each sending a probe of its own.
CREATE TABLE destination_probes (
    destination text PRIMARY KEY,
    pause_end   double precision NOT NULL,
    owner       text NOT NULL,
    started_at  double precision NOT NULL,
    outcome     text
);
