-- Version 19: an idempotency key stored before keys were scoped (version 8) belongs to the
-- submitter stored with it. Version 8 gave every existing key the local scope (''), so after
-- an upgrade an HTTP client's retry with its key was stored and sent again (an upgrade audit:
-- the recipient got the mail twice). A key its submitter has used again since keeps that
-- newer message; the old one stays where it is.
UPDATE messages SET idempotency_scope = submitter
WHERE idempotency_scope = ''
  AND idempotency_key IS NOT NULL
  AND submitter IS NOT NULL AND submitter <> ''
  AND NOT EXISTS (
      SELECT 1 FROM messages AS newer
      WHERE newer.idempotency_scope = messages.submitter
        AND newer.idempotency_key = messages.idempotency_key
  );
