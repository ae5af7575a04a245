-- Version 9: a row the readiness probe writes, so /readyz knows the store takes writes now
-- (a full disk or a lost server fail this write as they would fail mail).
CREATE TABLE store_checks (
    id         integer PRIMARY KEY CHECK (id = 1),
    checked_at double precision NOT NULL
);
