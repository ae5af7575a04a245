-- Version 15: dashboard sessions logged out, so that every process of the store refuses a
-- logged-out cookie (each row is kept until the session would have expired anyway).
CREATE TABLE dashboard_logouts (
    session_id text PRIMARY KEY,
    until      double precision NOT NULL
);
