-- Version 5: dead-letter recovery is measured from dead to delivered (not to requeued): a
-- requeued delivery remembers when it died until it is delivered.
ALTER TABLE deliveries ADD COLUMN dead_since double precision;
ALTER TABLE dead_letter_recoveries RENAME COLUMN requeued_at TO recovered_at;
DROP INDEX dead_letter_recoveries_requeued;
CREATE INDEX dead_letter_recoveries_recovered ON dead_letter_recoveries (recovered_at);
