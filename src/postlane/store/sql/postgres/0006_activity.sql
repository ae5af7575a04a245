-- Version 6: what the dashboard reads. Each minute's sample also counts the attempts that
-- deferred (temporary, throttled, connection) and the soft bounces; attempts are found by time
-- (the minute's counts, a destination's recent replies) without walking the whole history.
ALTER TABLE metric_samples ADD COLUMN deferrals integer NOT NULL DEFAULT 0;
ALTER TABLE metric_samples ADD COLUMN soft_bounces integer NOT NULL DEFAULT 0;
CREATE INDEX attempts_at ON attempts (at);
