-- Version 14: each minute's sample names the relays paused for a configuration that cannot
-- work (the alert on them reads the recorded history, as the others do).
ALTER TABLE metric_samples ADD COLUMN misconfigured TEXT NOT NULL DEFAULT '[]';
