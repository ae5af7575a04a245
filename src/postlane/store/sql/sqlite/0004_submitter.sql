-- Version 4: who handed a message in (an API token's fingerprint, an SMTP user), so a token
-- with the "send" scope reads back only its own messages.
ALTER TABLE messages ADD COLUMN submitter TEXT;
