-- Version 13: each minute's sample counts what was heard after the first hop: recipients
-- bounced later (a DSN, a provider's event) and complaints (the complaint-rate alert).
ALTER TABLE metric_samples ADD COLUMN bounced integer NOT NULL DEFAULT 0;
ALTER TABLE metric_samples ADD COLUMN complaints integer NOT NULL DEFAULT 0;
