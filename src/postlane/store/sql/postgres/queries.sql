-- Named queries of the PostgreSQL store. Each is under a "-- name: NAME" header with one line
-- saying what it does; the algorithms that run them are written once, for both databases, in
-- postlane/store/sqlstore.py. Parameters are psycopg's %(named)s placeholders (so a literal
-- percent sign would be written %%). Every column a caller reads is named (aggregates carry an
-- alias), as the SQLite queries of the same name name it.
--
-- Batches travel as arrays: `unnest(%(x)s::type[], ...)` turns parallel arrays into rows, so one
-- statement (one round trip) inserts or updates a whole batch (SQLite runs its version of a
-- batch query once per row). The explicit casts
-- type arrays that psycopg cannot type by itself (a list of only NULLs, an empty list).
-- The store reads under READ COMMITTED; comments below say where that matters.

-- name: lock_migrations
-- Serialise schema changes of one schema: processes starting together queue up here.
SELECT pg_advisory_xact_lock(hashtextextended('postlane.migrate:' || %(schema)s, 0));

-- name: schema_exists
-- Whether a schema exists (checked first: CREATE SCHEMA IF NOT EXISTS would still need the
-- CREATE privilege on the database, which a DBA-made schema's user may lack).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s);

-- name: version_table_exists
-- Whether postlane_schema_version exists where the search_path points.
SELECT to_regclass('postlane_schema_version') IS NOT NULL;

-- name: create_version_table
-- The applied migrations; created before any migration so the first one can be recorded.
CREATE TABLE postlane_schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: schema_version
-- The newest applied migration (0: a fresh schema).
SELECT coalesce(max(version), 0) FROM postlane_schema_version;

-- name: record_migration
-- Note one migration as applied.
INSERT INTO postlane_schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: set_search_path
-- Point unqualified names at one schema, for the session or (local) for this transaction only.
SELECT set_config('search_path', quote_ident(%(schema)s), %(local)s);

-- name: search_path
-- The search_path in force, to be put back after a local change.
SELECT current_setting('search_path') AS search_path;

-- name: restore_search_path
-- Put a saved search_path back for the rest of this transaction.
SELECT set_config('search_path', %(search_path)s, true);

-- name: read_snapshot
-- One snapshot for a multi-statement read (a consistent view, like SQLite's read transaction).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: notify_enqueued
-- Wake listening workers. NOTIFY is transactional: it is delivered at COMMIT and dropped on
-- ROLLBACK, so a worker never wakes for mail that is not there. The payload names the schema
-- holding the tables, so stores in other schemas of the same database ignore it.
SELECT pg_notify('postlane_enqueued', relnamespace::regnamespace::text)
FROM pg_class WHERE oid = 'messages'::regclass;

-- name: tables_schema
-- The schema holding postlane's tables, as notify_enqueued names it.
SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'messages'::regclass;

-- name: listen
-- Subscribe this connection to enqueue notifications.
LISTEN postlane_enqueued;

-- name: suppressed_among
-- Which of some lower-cased addresses are on the suppression list.
SELECT address FROM suppressions WHERE address = ANY(%(addresses)s::text[]);

-- name: insert_messages
-- Store new messages (content once per message); one whose idempotency key is already stored
-- is skipped. Under READ COMMITTED, a conflicting row of a concurrent uncommitted transaction
-- makes this wait for that transaction: if it commits, ours is skipped, if it rolls back, ours
-- goes in. That makes the key hold under concurrent enqueues from any number of processes.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      fingerprint, size, metadata, created_at, send_at, expires_at, done_at,
                      submitter, content)
SELECT id, lane, sender, subject, message_id, idempotency_scope, idempotency_key, fingerprint,
       size, metadata::jsonb, created_at, send_at, expires_at, done_at, submitter, content
FROM unnest(%(id)s::text[], %(lane)s::text[], %(sender)s::text[], %(subject)s::text[],
            %(message_id)s::text[], %(idempotency_scope)s::text[], %(idempotency_key)s::text[],
            %(fingerprint)s::text[], %(size)s::integer[], %(metadata)s::text[],
            %(created_at)s::float8[], %(send_at)s::float8[], %(expires_at)s::float8[],
            %(done_at)s::float8[], %(submitter)s::text[], %(content)s::bytea[])
     AS m (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
           fingerprint, size, metadata, created_at, send_at, expires_at, done_at, submitter,
           content)
ON CONFLICT (idempotency_scope, idempotency_key) DO NOTHING
RETURNING id;

-- name: messages_by_idempotency_key
-- The messages first stored under some submitters' idempotency keys, and their payloads'
-- digests (a new statement: under READ COMMITTED it sees the row a concurrent transaction
-- committed while insert_messages waited).
SELECT m.idempotency_scope, m.idempotency_key, m.id, m.fingerprint
FROM messages m
JOIN unnest(%(scope)s::text[], %(key)s::text[]) AS k (scope, key)
  ON m.idempotency_scope = k.scope AND m.idempotency_key = k.key;

-- name: insert_deliveries
-- The recipients of new messages, due at once or at their send_at (or suppressed, never
-- attempted).
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        next_attempt_at, expires_at, updated_at, reason)
SELECT queue_id, address, domain, destination, lane, created_at, state, next_attempt_at,
       expires_at, created_at, reason
FROM unnest(%(queue_id)s::text[], %(address)s::text[], %(domain)s::text[],
            %(destination)s::text[], %(lane)s::text[], %(created_at)s::float8[],
            %(next_attempt_at)s::float8[], %(expires_at)s::float8[], %(state)s::text[],
            %(reason)s::text[])
     AS d (queue_id, address, domain, destination, lane, created_at, next_attempt_at,
           expires_at, state, reason);

-- name: insert_enqueue_events
-- The events of new messages' recipients: queued, or suppressed (never attempted).
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, metadata)
SELECT CASE WHEN d.state = 'suppressed' THEN 'suppressed' ELSE 'queued' END, %(now)s,
       d.queue_id, d.id, d.address, d.lane, m.metadata
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.queue_id = ANY(%(ids)s::text[])
ORDER BY d.id;

-- name: insert_events
-- Events of deliveries, with their messages' lanes and metadata.
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, class, code, enhanced,
                    text, metadata)
SELECT e.type, e.at, d.queue_id, d.id, d.address, d.lane, e.class, e.code, e.enhanced, e.text,
       m.metadata
FROM unnest(%(type)s::text[], %(at)s::float8[], %(delivery_id)s::bigint[], %(class)s::text[],
            %(code)s::integer[], %(enhanced)s::text[], %(text)s::text[]) WITH ORDINALITY
     AS e (type, at, delivery_id, class, code, enhanced, text, n)
JOIN deliveries d ON d.id = e.delivery_id
JOIN messages m ON m.id = d.queue_id
ORDER BY e.n;

-- name: claim_lane
-- Lease the oldest due deliveries of one lane. The subquery walks deliveries_due in
-- next_attempt_at order and stops after %(limit)s rows.
-- FOR UPDATE SKIP LOCKED is what lets many workers on many hosts claim from one table at once:
-- a row another worker's claim has locked (and is about to lease) is skipped instead of waited
-- for, so claims neither queue up behind each other nor lease a delivery twice. After the lock,
-- PostgreSQL re-checks the WHERE clause on the row's latest version, so a row another claim
-- leased and committed meanwhile (no longer 'queued'/'deferred') is dropped too.
UPDATE deliveries
SET state = 'sending', lease_owner = %(owner)s, lease_expires_at = %(lease_until)s,
    updated_at = %(now)s
WHERE id IN (
    SELECT id FROM deliveries
    WHERE state IN ('queued', 'deferred') AND lane = %(lane)s AND next_attempt_at <= %(now)s
      AND (expires_at IS NULL OR expires_at > %(now)s)
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class, expires_at;

-- name: claim_rest_of_messages
-- Lease the other due deliveries of messages a claim reached, so one message's recipients go
-- out in one transaction (a claim may pass its limit by the rest of one message). SKIP LOCKED
-- as above: a recipient another host's claim holds is that host's to send.
UPDATE deliveries
SET state = 'sending', lease_owner = %(owner)s, lease_expires_at = %(lease_until)s,
    updated_at = %(now)s
WHERE id IN (
    SELECT id FROM deliveries
    WHERE queue_id = ANY(%(queue_ids)s::text[])
      AND state IN ('queued', 'deferred') AND next_attempt_at <= %(now)s
      AND (expires_at IS NULL OR expires_at > %(now)s)
    FOR UPDATE SKIP LOCKED
)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class, expires_at;

-- name: claimed_messages
-- The stored fields and bytes of the messages a claim leased deliveries of.
SELECT id, lane, sender, message_id, idempotency_key, created_at, content
FROM messages WHERE id = ANY(%(ids)s::text[]);

-- name: lock_messages_of
-- Lock, in id order, the messages of deliveries about to reach a final state. Two workers
-- finishing the last two recipients of one message at once would each, under READ COMMITTED,
-- still see the other's recipient pending and neither would mark the message done; holding
-- the message row makes the second wait and then see the first's result. FOR NO KEY UPDATE
-- does not block inserts of rows referencing the message; the id order prevents deadlocks.
SELECT id FROM messages
WHERE id IN (SELECT queue_id FROM deliveries WHERE id = ANY(%(ids)s::bigint[]))
ORDER BY id
FOR NO KEY UPDATE;

-- name: record_outcomes
-- Apply a batch of outcomes, each only if its delivery is still leased by this worker. An
-- operator's hold during the send wins over a retry; an outcome without an attempt (class
-- NULL) keeps the previous reply.
UPDATE deliveries AS d
SET state = CASE WHEN d.hold_after AND o.state IN ('queued', 'deferred') THEN 'held'
                 ELSE o.state END,
    attempts = o.attempts, deferrals = o.deferrals,
    next_attempt_at = coalesce(o.next_attempt_at, d.next_attempt_at),
    lease_owner = NULL, lease_expires_at = NULL, hold_after = false,
    last_code = CASE WHEN o.class IS NULL THEN d.last_code ELSE o.code END,
    last_enhanced = CASE WHEN o.class IS NULL THEN d.last_enhanced ELSE o.enhanced END,
    last_text = CASE WHEN o.class IS NULL THEN d.last_text ELSE o.text END,
    last_class = coalesce(o.class, d.last_class),
    reason = o.reason, updated_at = %(now)s
FROM unnest(%(id)s::bigint[], %(state)s::text[], %(attempts)s::integer[],
            %(deferrals)s::integer[], %(next_attempt_at)s::float8[], %(code)s::integer[],
            %(enhanced)s::text[], %(text)s::text[], %(class)s::text[], %(reason)s::text[])
     AS o (id, state, attempts, deferrals, next_attempt_at, code, enhanced, text, class, reason)
WHERE d.id = o.id AND d.state = 'sending' AND d.lease_owner = %(owner)s
RETURNING d.id, d.queue_id, d.address;

-- name: insert_attempts
-- Tries in deliveries' histories.
INSERT INTO attempts (delivery_id, at, class, code, enhanced, text, relay, destination,
                      duration_ms, counted)
SELECT *
FROM unnest(%(delivery_id)s::bigint[], %(at)s::float8[], %(class)s::text[],
            %(code)s::integer[], %(enhanced)s::text[], %(text)s::text[], %(relay)s::text[],
            %(destination)s::text[], %(duration_ms)s::integer[], %(counted)s::boolean[]);

-- name: mark_done
-- Note when messages' last recipient reached a final state (for retention).
UPDATE messages AS m SET done_at = %(now)s
WHERE m.id = ANY(%(ids)s::text[]) AND m.done_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.queue_id = m.id
                    AND d.state IN ('queued', 'sending', 'deferred', 'held'));

-- name: insert_suppression
-- Add addresses to the suppression list (first reason wins; an address twice in one batch:
-- its first row).
INSERT INTO suppressions (address, created_at, source, reason, code, enhanced, text, queue_id)
SELECT DISTINCT ON (address) address, created_at, source, reason, code, enhanced, text,
       queue_id
FROM unnest(%(address)s::text[], %(created_at)s::float8[], %(source)s::text[],
            %(reason)s::text[], %(code)s::integer[], %(enhanced)s::text[], %(text)s::text[],
            %(queue_id)s::text[]) WITH ORDINALITY
     AS s (address, created_at, source, reason, code, enhanced, text, queue_id, n)
ORDER BY address, n
ON CONFLICT (address) DO NOTHING;

-- name: insert_recoveries
-- Requeued dead letters that were just delivered: their recovery time (dead to delivered).
-- The rows are this transaction's own (record_outcomes just updated them).
INSERT INTO dead_letter_recoveries (queue_id, address, class, dead_at, recovered_at)
SELECT queue_id, address, 'delivered', dead_since, %(now)s FROM deliveries
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'sent' AND dead_since IS NOT NULL;

-- name: clear_dead_since
-- Their recovery is recorded.
UPDATE deliveries SET dead_since = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND dead_since IS NOT NULL;

-- name: renew_leases
-- Push out every lease a live worker holds.
UPDATE deliveries SET lease_expires_at = %(lease_until)s
WHERE lease_owner = %(owner)s AND state = 'sending';

-- name: hand_back_all
-- Return every delivery a worker holds, unattempted (graceful shutdown).
UPDATE deliveries
SET state = CASE WHEN hold_after THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = false, updated_at = %(now)s
WHERE lease_owner = %(owner)s AND state = 'sending';

-- name: hand_back_some
-- Return some deliveries a worker holds, unattempted.
UPDATE deliveries
SET state = CASE WHEN hold_after THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = false, updated_at = %(now)s
WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s AND state = 'sending';

-- name: expired_leases
-- A slice of deliveries whose worker stopped renewing its lease, locked for this reap. SKIP
-- LOCKED: a row locked by its worker's late record is that worker's to settle, and two
-- reapers on two hosts split the rows instead of waiting on each other.
SELECT id FROM deliveries
WHERE state = 'sending' AND lease_expires_at <= %(now)s
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: reap_leases
-- Make deliveries with an expired lease due now; the try counts (it may have been sent).
UPDATE deliveries
SET state = CASE WHEN hold_after THEN 'held' ELSE 'queued' END,
    attempts = attempts + 1, next_attempt_at = %(now)s,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = false,
    last_code = NULL, last_enhanced = NULL,
    last_text = 'worker ' || lease_owner || ' stopped without recording a result (lease expired)',
    last_class = 'temporary', reason = 'lease expired', updated_at = %(now)s
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'sending' AND lease_expires_at <= %(now)s
RETURNING id, destination, last_text;

-- name: expire_owner_leases
-- End the leases of dead owners now, so the next reap returns their deliveries.
UPDATE deliveries SET lease_expires_at = %(now)s
WHERE lease_owner = ANY(%(owners)s::text[]) AND state = 'sending';

-- name: lease_owners
-- Workers that hold leases.
SELECT DISTINCT lease_owner FROM deliveries
WHERE state = 'sending' AND lease_owner IS NOT NULL
ORDER BY lease_owner;

-- name: next_due_at
-- The earliest next attempt time of any waiting delivery: one index probe per lane (least()
-- ignores NULLs), where a min() over all lanes would read the whole partial index.
SELECT least(
    (SELECT min(next_attempt_at) FROM deliveries
     WHERE state IN ('queued', 'deferred') AND lane = 'high'),
    (SELECT min(next_attempt_at) FROM deliveries
     WHERE state IN ('queued', 'deferred') AND lane = 'normal'),
    (SELECT min(next_attempt_at) FROM deliveries
     WHERE state IN ('queued', 'deferred') AND lane = 'low')) AS next_at;

-- name: expire_deliveries
-- A slice of waiting deliveries whose time ran out: dead, never sent late.
UPDATE deliveries
SET state = 'dead', reason = 'expired', lease_owner = NULL, lease_expires_at = NULL,
    hold_after = false, updated_at = %(now)s
WHERE id IN (
    SELECT id FROM deliveries
    WHERE expires_at IS NOT NULL AND expires_at <= %(now)s
      AND state IN ('queued', 'deferred', 'held')
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, queue_id;

-- name: purge_finished
-- Remove a slice of messages past their retention (all recipients final; dead letters kept for
-- their own retention); deliveries and attempts go with them (ON DELETE CASCADE).
DELETE FROM messages
WHERE id IN (
    SELECT id FROM messages
    WHERE done_at <= %(cutoff)s
      AND (done_at <= %(dead_cutoff)s
           OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.id
                          AND d.state = 'dead'))
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id;

-- name: messages
-- Some messages' stored fields (not their content).
SELECT id, lane, sender, subject, message_id, idempotency_key, size, metadata, created_at,
       submitter, send_at, expires_at
FROM messages WHERE id = ANY(%(ids)s::text[]);

-- name: message_exists
-- Whether a message is stored.
SELECT 1 AS found FROM messages WHERE id = %(id)s;

-- name: message_content
-- A message's stored bytes.
SELECT content FROM messages WHERE id = %(id)s;

-- name: recipients_of
-- The recipients of some messages, each message's in the order they were given.
SELECT queue_id, id, address, domain, destination, state, attempts, next_attempt_at, last_code,
       last_enhanced, last_text, last_class, updated_at, reason
FROM deliveries WHERE queue_id = ANY(%(ids)s::text[]) ORDER BY queue_id, id;

-- name: histories_of
-- Every attempt of some deliveries, oldest first.
SELECT delivery_id, at, class, code, enhanced, text, duration_ms, relay, destination, counted
FROM attempts WHERE delivery_id = ANY(%(ids)s::bigint[]) ORDER BY delivery_id, id;

-- name: list_message_ids
-- The messages with a selected recipient, oldest first ({selection} is a WHERE clause over
-- deliveries d, built from a Selector).
SELECT queue_id, min(created_at) AS first_created, min(id) AS first_id FROM deliveries d
WHERE {selection}
GROUP BY queue_id ORDER BY first_created, first_id LIMIT %(limit)s;

-- name: page_rows
-- Deliveries in arrival order after a cursor (the dashboard's queue pages; {selection} narrows).
SELECT d.id, d.queue_id FROM deliveries d
WHERE d.id > %(after)s AND {selection}
ORDER BY d.id LIMIT %(limit)s;

-- name: counts_by_lane_state
-- Depth by lane and state, and the oldest creation time in each (covered by an index).
SELECT lane, state, count(*) AS n, min(created_at) AS oldest FROM deliveries GROUP BY lane, state;

-- name: suppression_count
-- How many addresses are on the suppression list.
SELECT count(*) AS n FROM suppressions;

-- name: dead_letters
-- Dead recipients with their message's sender and subject and their last relay, newest first
-- ({selection} as above).
SELECT d.id, d.queue_id, d.address, d.domain, d.destination, d.lane, d.attempts,
       d.last_class, d.updated_at, d.last_code, d.last_enhanced, d.last_text, d.reason,
       m.sender, m.subject,
       (SELECT relay FROM attempts a WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1)
           AS relay
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE {selection}
ORDER BY d.updated_at DESC, d.id LIMIT %(limit)s;

-- name: dead_letters_of
-- The dead recipients of one message, as dead_letters gives them.
SELECT d.id, d.queue_id, d.address, d.domain, d.destination, d.lane, d.attempts,
       d.last_class, d.updated_at, d.last_code, d.last_enhanced, d.last_text, d.reason,
       m.sender, m.subject,
       (SELECT relay FROM attempts a WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1)
           AS relay
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.queue_id = %(id)s AND d.state = 'dead'
ORDER BY d.id;

-- name: select_delivery_ids
-- A slice of the selected deliveries, in id order from just above %(after)s ({selection} as
-- above): bulk actions walk a selection in such slices.
SELECT d.id FROM deliveries d
WHERE {selection} AND d.id > %(after)s
ORDER BY d.id LIMIT %(limit)s;

-- name: summarize
-- What an action would touch: counts by lane, domain, state and last reply class.
SELECT lane, domain, state, last_class, count(*) AS n FROM deliveries d
WHERE {selection}
GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2;

-- name: selected_destinations
-- The destinations of the selected deliveries, as stored at enqueue ({selection} as above).
SELECT DISTINCT destination FROM deliveries d
WHERE {selection}
ORDER BY 1;

-- name: dead_groups
-- Dead letters that failed alike (before masking the replies' details in Python).
SELECT last_class, domain, last_code, last_enhanced, last_text, count(*) AS n,
       min(updated_at) AS first_dead_at, max(updated_at) AS last_dead_at,
       min(queue_id) AS sample_id
FROM deliveries d
WHERE {selection}
GROUP BY 1, 2, 3, 4, 5;

-- name: shape
-- Waiting recipients by domain and age bucket (qshape; {bucket} numbers a recipient's age
-- bucket), the busiest domains first.
WITH counts AS (
    SELECT domain, {bucket} AS bucket, count(*) AS n
    FROM deliveries
    WHERE state IN ('queued', 'deferred', 'sending')
    GROUP BY 1, 2
), totals AS (
    SELECT domain, sum(n)::bigint AS total FROM counts
    GROUP BY domain ORDER BY total DESC, domain LIMIT %(limit)s
)
SELECT c.domain, t.total, c.bucket, c.n
FROM counts c JOIN totals t ON t.domain = c.domain
ORDER BY t.total DESC, c.domain, c.bucket;

-- name: flush
-- Make queued or deferred deliveries due now (postqueue -f).
UPDATE deliveries
SET state = 'queued', next_attempt_at = %(now)s, updated_at = %(now)s, reason = 'flushed'
WHERE id = ANY(%(ids)s::bigint[]) AND state IN ('queued', 'deferred');

-- name: hold
-- Hold queued or deferred deliveries (postsuper -h).
UPDATE deliveries SET state = 'held', updated_at = %(now)s, reason = 'held by an operator'
WHERE id = ANY(%(ids)s::bigint[]) AND state IN ('queued', 'deferred');

-- name: hold_after_send
-- A delivery being sent is held once its try is recorded (unless it was delivered).
UPDATE deliveries SET hold_after = true
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'sending';

-- name: release
-- Release held deliveries, due now (postsuper -H).
UPDATE deliveries
SET state = 'queued', next_attempt_at = %(now)s, updated_at = %(now)s, reason = 'released'
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'held';

-- name: release_after_send
-- Cancel a pending hold of a delivery being sent.
UPDATE deliveries SET hold_after = false
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'sending';

-- name: delete_deliveries
-- Remove deliveries still in the given states; their attempts go with them (ON DELETE
-- CASCADE). The state is checked again here: a worker on another host may have leased one
-- since the operator selected (and exported) it, and deleting it then would let an import
-- send it a second time.
DELETE FROM deliveries
WHERE id = ANY(%(ids)s::bigint[]) AND state = ANY(%(states)s::text[])
RETURNING queue_id;

-- name: delete_empty_messages
-- Remove messages none of whose recipients is left.
DELETE FROM messages AS m
WHERE m.id = ANY(%(ids)s::text[])
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = m.id);

-- name: requeue_dead
-- Dead deliveries start afresh: no attempts used, due now, max_age counted from now. Each
-- remembers when it died (dead_since: updated_at before this update), for the recovery time.
UPDATE deliveries
SET state = 'queued', attempts = 0, deferrals = 0, next_attempt_at = %(now)s,
    created_at = %(now)s, dead_since = updated_at, updated_at = %(now)s,
    reason = 'requeued from the dead-letter queue'
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'dead'
RETURNING id, queue_id, dead_since AS dead_at;

-- name: reopen_messages
-- Messages with a recipient waiting again are not finished.
UPDATE messages SET done_at = NULL WHERE id = ANY(%(ids)s::text[]) AND done_at IS NOT NULL;

-- name: export_recipients
-- Some deliveries, everything about them, in id order.
SELECT queue_id, id, address, domain, destination, state, attempts, deferrals,
       next_attempt_at, created_at, last_code, last_enhanced, last_text, last_class, reason
FROM deliveries WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id;

-- name: messages_with_content
-- Some messages' stored fields and bytes.
SELECT id, lane, sender, subject, message_id, idempotency_key, metadata, created_at, content
FROM messages WHERE id = ANY(%(ids)s::text[]);

-- name: message_or_key
-- Whether a message id is stored, and whether its submitter's idempotency key is held.
SELECT EXISTS (SELECT 1 FROM messages WHERE id = %(id)s) AS message_exists,
       EXISTS (SELECT 1 FROM messages
               WHERE idempotency_scope = %(scope)s AND idempotency_key = %(key)s) AS key_held;

-- name: import_message
-- An exported message, back with its id, Message-ID and content.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      size, metadata, created_at, submitter, content)
VALUES (%(id)s, %(lane)s, %(sender)s, %(subject)s, %(message_id)s, %(scope)s,
        %(idempotency_key)s, %(size)s, %(metadata)s::jsonb, %(created_at)s, %(submitter)s,
        %(content)s);

-- name: delivery_exists
-- Whether a message already has a recipient (import skips it).
SELECT 1 AS found FROM deliveries
WHERE queue_id = %(queue_id)s AND lower(address) = lower(%(address)s);

-- name: import_delivery
-- An exported recipient, back with its state and history.
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        attempts, deferrals, next_attempt_at, last_code, last_enhanced,
                        last_text, last_class, reason, updated_at)
VALUES (%(queue_id)s, %(address)s, %(domain)s, %(destination)s, %(lane)s, %(created_at)s,
        %(state)s, %(attempts)s, %(deferrals)s, %(next_attempt_at)s, %(code)s, %(enhanced)s,
        %(text)s, %(class)s, %(reason)s, %(now)s)
RETURNING id;

-- name: defer_unattempted
-- Hand leased deliveries back to wait until given times, without an attempt (a destination
-- that cannot take them now: rate, concurrency, pause).
UPDATE deliveries AS d
SET state = CASE WHEN d.hold_after THEN 'held'
                 WHEN o.next_attempt_at > %(now)s THEN 'deferred' ELSE 'queued' END,
    next_attempt_at = o.next_attempt_at, lease_owner = NULL, lease_expires_at = NULL,
    hold_after = false, reason = %(reason)s, updated_at = %(now)s
FROM unnest(%(id)s::bigint[], %(next_attempt_at)s::float8[]) AS o (id, next_attempt_at)
WHERE d.id = o.id AND d.lease_owner = %(owner)s AND d.state = 'sending';

-- name: defer_destination
-- Push every waiting delivery of a paused destination to the end of its pause, so claims do
-- not walk over them meanwhile (uses deliveries_destination).
UPDATE deliveries
SET next_attempt_at = %(until)s, reason = %(reason)s, updated_at = %(now)s
WHERE destination = %(destination)s AND state IN ('queued', 'deferred')
  AND next_attempt_at < %(until)s;

-- name: hasten_destination
-- Call back a destination's deliveries that wait for a slot, to be spaced at its new rate.
UPDATE deliveries SET next_attempt_at = %(now)s, updated_at = %(now)s
WHERE destination = %(destination)s AND state IN ('queued', 'deferred')
  AND next_attempt_at > %(now)s AND reason = %(reason)s;

-- name: hasten_all
-- Call back every delivery that waits for a slot (the relay's rate grew).
UPDATE deliveries SET next_attempt_at = %(now)s, updated_at = %(now)s
WHERE state IN ('queued', 'deferred') AND next_attempt_at > %(now)s AND reason = %(reason)s;

-- name: save_destination_states
-- Record destinations' pauses and rates (upsert; one row per destination in a batch).
INSERT INTO destination_state (destination, rate, paused_until, reason, updated_at)
SELECT *
FROM unnest(%(destination)s::text[], %(rate)s::float8[], %(paused_until)s::float8[],
            %(reason)s::text[], %(updated_at)s::float8[])
ON CONFLICT (destination) DO UPDATE
SET rate = excluded.rate, paused_until = excluded.paused_until, reason = excluded.reason,
    updated_at = excluded.updated_at;

-- name: destination_states
-- Every destination's recorded pause and rate.
SELECT destination, rate, paused_until, reason, updated_at FROM destination_state
ORDER BY destination;

-- name: sending_by_destination
-- Deliveries being sent now, by destination.
SELECT destination, count(*) AS n FROM deliveries WHERE state = 'sending' GROUP BY destination;

-- name: lift_destinations
-- An operator's flush ends some destinations' pauses and slow-downs.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = %(now)s
WHERE destination = ANY(%(destinations)s::text[]);

-- name: lift_all_destinations
-- An operator's flush of everything ends every pause and slow-down; returns the destinations.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = %(now)s
RETURNING destination;

-- name: flush_destinations
-- A flush makes the deferred deliveries of these destinations due now.
UPDATE deliveries
SET state = 'queued', next_attempt_at = %(now)s, reason = 'flushed', updated_at = %(now)s
WHERE destination = ANY(%(destinations)s::text[])
  AND state IN ('queued', 'deferred') AND next_attempt_at > %(now)s;

-- name: insert_samples
-- Minutes' samples of lanes (the first process to record a minute wins).
INSERT INTO metric_samples (at, lane, ready, deferred, held, sending, oldest_age, sent, dead,
                            hard_bounces, paused, deferrals, soft_bounces)
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
       paused::jsonb, deferrals, soft_bounces
FROM unnest(%(at)s::float8[], %(lane)s::text[], %(ready)s::integer[], %(deferred)s::integer[],
            %(held)s::integer[], %(sending)s::integer[], %(oldest_age)s::float8[],
            %(sent)s::integer[], %(dead)s::integer[], %(hard_bounces)s::integer[],
            %(paused)s::text[], %(deferrals)s::integer[], %(soft_bounces)s::integer[])
     AS s (at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
           paused, deferrals, soft_bounces)
ON CONFLICT (at, lane) DO NOTHING;

-- name: samples_since
-- The recorded history from a time on, oldest first.
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
       paused::text AS paused, deferrals, soft_bounces
FROM metric_samples WHERE at >= %(since)s ORDER BY at, lane;

-- name: purge_samples
-- Forget history older than the retention.
DELETE FROM metric_samples WHERE at < %(before)s;

-- name: finished_between
-- Recipients delivered, dead-lettered, and hard-bounced in a time range.
SELECT (SELECT count(*) FROM deliveries
        WHERE state = 'sent' AND updated_at >= %(start)s AND updated_at < %(end)s) AS sent,
       count(*) AS dead, count(*) FILTER (WHERE last_class = 'hard_bounce') AS hard_bounces
FROM deliveries WHERE state = 'dead' AND updated_at >= %(start)s AND updated_at < %(end)s;

-- name: recoveries_after
-- Dead letters requeued since a row id (for the recovery-time histogram).
SELECT id, recovered_at - dead_at AS seconds FROM dead_letter_recoveries
WHERE id > %(after)s ORDER BY id;

-- name: alert_fire
-- An alert starts firing: a change only for the process that made it.
INSERT INTO alert_state (name, firing, since, updated_at) VALUES (%(name)s, true, %(now)s, %(now)s)
ON CONFLICT (name) DO UPDATE SET firing = true, since = %(now)s, updated_at = %(now)s
WHERE NOT alert_state.firing;

-- name: alert_resolve
-- A firing alert resolves: a change only for the process that made it.
UPDATE alert_state SET firing = false, since = %(now)s, updated_at = %(now)s
WHERE name = %(name)s AND firing;

-- name: alerts_firing
-- Alerts recorded as firing, with since when.
SELECT name, since FROM alert_state WHERE firing ORDER BY name;

-- name: attempt_classes_between
-- Attempts in a time range, by class (a minute's deferrals and soft bounces).
SELECT class, count(*) AS n FROM attempts WHERE at >= %(start)s AND at < %(end)s GROUP BY class;

-- name: destination_replies_since
-- Recent attempts by destination and class (the dashboard's destinations page).
SELECT destination, class, count(*) AS n FROM attempts WHERE at >= %(since)s
GROUP BY destination, class;

-- name: suppressions
-- The suppression list, newest first.
SELECT address, created_at, source, reason, code, enhanced, text, queue_id
FROM suppressions ORDER BY created_at DESC, address LIMIT %(limit)s;

-- name: delete_suppression
-- Take an address off the suppression list.
DELETE FROM suppressions WHERE address = %(address)s;

-- name: events_after
-- Events after a cursor, in (tx, id) order, of transactions older than every one still
-- running: a transaction that took its ids earlier but commits later is read once it has
-- committed, never behind a cursor already passed.
SELECT id, type, at, queue_id, recipient, lane, class, code, enhanced, text, metadata
FROM events
WHERE (tx, id) > (%(tx)s::xid8, %(after)s)
  AND tx < pg_snapshot_xmin(pg_current_snapshot())
  AND (%(any_type)s OR type = ANY(%(types)s::text[]))
ORDER BY tx, id LIMIT %(limit)s;

-- name: event_cursor
-- The position of a kept event (a cursor that names it can be followed).
SELECT tx::text AS tx, id FROM events WHERE id = %(id)s;

-- name: purge_events
-- Forget events older than their retention.
DELETE FROM events WHERE at < %(before)s;
