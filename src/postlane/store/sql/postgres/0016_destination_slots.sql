-- Version 16: the fleet's schedule of a destination's rate. Deliveries that processes sharing
-- the rate send back to wait take their slots from one sequence, spaced at the rate, so the
-- mail that comes back due adds up to the rate whichever process claimed it (each process
-- spacing its own slots at its share left the schedule as thin as the shares were when it
-- was made).
CREATE TABLE destination_slots (
    destination text PRIMARY KEY,
    next_slot   double precision NOT NULL
);
