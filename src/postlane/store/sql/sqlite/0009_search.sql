-- Version 9: finding a recipient's or a sender's mail in a deep queue (`queue list
-- --recipient/--sender`, the dashboard's search) reads an index instead of every row.
CREATE INDEX deliveries_address ON deliveries (lower(address));
CREATE INDEX messages_sender ON messages (lower(sender));
