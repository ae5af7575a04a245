-- Version 21: a suppression names the lanes it stops. A one-click unsubscribe from bulk mail
-- ([unsubscribe] lanes) stops that kind of mail only, never the password resets and receipts
-- of the other lanes; a hard bounce, a complaint or an operator's entry stops every lane.
-- NULL: every lane (what every entry made before this version keeps); else a JSON array of
-- lane names, as metric_samples keeps its lists.
ALTER TABLE suppressions ADD COLUMN lanes jsonb;
