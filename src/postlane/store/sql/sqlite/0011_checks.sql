-- Version 11: a row the readiness probe writes, so /readyz knows the store takes writes now
-- (a full disk, a corrupted file or a lost server fail this write as they would fail mail).
CREATE TABLE store_checks (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at REAL NOT NULL
);
