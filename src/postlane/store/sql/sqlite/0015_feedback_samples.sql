-- Version 15: each minute's sample counts what was heard after the first hop: recipients
-- bounced later (a DSN, a provider's event) and complaints (the complaint-rate alert).
ALTER TABLE metric_samples ADD COLUMN bounced INTEGER NOT NULL DEFAULT 0;
ALTER TABLE metric_samples ADD COLUMN complaints INTEGER NOT NULL DEFAULT 0;
