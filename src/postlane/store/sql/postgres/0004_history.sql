-- Version 4: a compact recorded history for `postlane alerts` and the dashboard (one row per
-- minute and lane; queue-wide events and paused destinations under lane '*'), the state of
-- each alert (so one process notifies a transition), and an index to count finished
-- deliveries by time.
CREATE TABLE metric_samples (
    at           double precision NOT NULL,
    lane         text NOT NULL,
    ready        integer NOT NULL DEFAULT 0,
    deferred     integer NOT NULL DEFAULT 0,
    held         integer NOT NULL DEFAULT 0,
    sending      integer NOT NULL DEFAULT 0,
    oldest_age   double precision NOT NULL DEFAULT 0,
    sent         integer NOT NULL DEFAULT 0,
    dead         integer NOT NULL DEFAULT 0,
    hard_bounces integer NOT NULL DEFAULT 0,
    paused       jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (at, lane)
);

CREATE TABLE alert_state (
    name        text PRIMARY KEY,
    firing      boolean NOT NULL,
    since       double precision NOT NULL,
    updated_at  double precision NOT NULL
);

CREATE INDEX deliveries_sent_at ON deliveries (updated_at) WHERE state = 'sent';
