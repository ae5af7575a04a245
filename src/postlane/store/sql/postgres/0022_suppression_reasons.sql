-- Version 22: one entry per address, scope and reason. A hard bounce after an unsubscribe used
-- to widen the one entry of its address and scope and take its reason, so removing it later
-- (the bounce was a mistake) removed the recipient's unsubscribe with it: mail the recipient
-- had asked not to get went out again. Now each reason is an entry of its own, removed on its
-- own (suppress remove --reason); an entry widened before this version stays one entry.
ALTER TABLE suppressions DROP CONSTRAINT suppressions_pkey;
ALTER TABLE suppressions ADD PRIMARY KEY (address, scope, reason);
