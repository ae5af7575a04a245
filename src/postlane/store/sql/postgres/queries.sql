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

-- name: session_lock_timeout
-- How long a pooled connection's statements wait for a lock (the pool's timeout).
SELECT set_config('lock_timeout', %(timeout)s, false);

-- name: migration_lock_timeout
-- How long the migration's statements wait for a table another session holds (this
-- transaction only); then it gives up and is tried again.
SELECT set_config('lock_timeout', %(timeout)s, true);

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

-- name: notify_destinations
-- Tell listening workers that a destination was paused or its pause lifted (at COMMIT, as
-- notify_enqueued): the fleet stops and starts together, not at each process's next sync.
SELECT pg_notify('postlane_destinations', relnamespace::regnamespace::text)
FROM pg_class WHERE oid = 'messages'::regclass;

-- name: tables_schema
-- The schema holding postlane's tables, as notify_enqueued names it.
SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'messages'::regclass;

-- name: listen
-- Subscribe this connection to enqueue notifications, and to destinations paused or lifted.
LISTEN postlane_enqueued;
LISTEN postlane_destinations;

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
          last_class, expires_at, reason = 'flushed' AS flushed;

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
          last_class, expires_at, reason = 'flushed' AS flushed;

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
-- operator's hold during the send wins over a retry; an outcome without an attempt (text
-- NULL) keeps the previous reply, and its class unless it gives one (what held a never-tried
-- one back).
UPDATE deliveries AS d
SET state = CASE WHEN d.hold_after AND o.state IN ('queued', 'deferred') THEN 'held'
                 ELSE o.state END,
    attempts = o.attempts, deferrals = o.deferrals,
    next_attempt_at = coalesce(o.next_attempt_at, d.next_attempt_at),
    lease_owner = NULL, lease_expires_at = NULL, hold_after = false,
    last_code = CASE WHEN o.text IS NULL THEN d.last_code ELSE o.code END,
    last_enhanced = CASE WHEN o.text IS NULL THEN d.last_enhanced ELSE o.enhanced END,
    last_text = coalesce(o.text, d.last_text),
    last_class = coalesce(o.class, d.last_class),
    reason = o.reason, updated_at = %(now)s
FROM unnest(%(id)s::bigint[], %(state)s::text[], %(attempts)s::integer[],
            %(deferrals)s::integer[], %(next_attempt_at)s::float8[], %(code)s::integer[],
            %(enhanced)s::text[], %(text)s::text[], %(class)s::text[], %(reason)s::text[])
     AS o (id, state, attempts, deferrals, next_attempt_at, code, enhanced, text, class, reason)
WHERE d.id = o.id AND d.state = 'sending' AND d.lease_owner = %(owner)s
RETURNING d.id, d.queue_id, d.address, d.dead_since;

-- name: insert_suppression
-- Add addresses to the suppression list in their scopes, for their reasons (each reason an
-- entry of its own: removing a mistaken hard bounce leaves the recipient's unsubscribe). The
-- first entry wins, unless it expired (then replaced) or the new one, for the same reason,
-- stops lanes it does not (an unsubscribe from one kind of mail, then from another): then it is
-- widened to every lane (lanes NULL) or to both's lanes, lasts as long as the longer of the two
-- (stopping less, for less long, would undo what the recipient asked), and takes the new one's
-- detail and reply. An entry twice in one batch (one statement may change a row once): its
-- first row for every lane if it has one, else its first row.
INSERT INTO suppressions (address, scope, reason, created_at, expires_at, detail, source, code,
                          enhanced, text, queue_id, lanes)
SELECT DISTINCT ON (address, scope, reason) address, scope, reason, created_at, expires_at, detail,
       source, code, enhanced, text, queue_id, lanes::jsonb
FROM unnest(%(address)s::text[], %(scope)s::text[], %(reason)s::text[],
            %(created_at)s::float8[], %(expires_at)s::float8[], %(detail)s::text[],
            %(source)s::text[], %(code)s::integer[], %(enhanced)s::text[], %(text)s::text[],
            %(queue_id)s::text[], %(lanes)s::text[]) WITH ORDINALITY
     AS s (address, scope, reason, created_at, expires_at, detail, source, code, enhanced,
           text, queue_id, lanes, n)
ORDER BY address, scope, reason, lanes IS NOT NULL, n
ON CONFLICT (address, scope, reason) DO UPDATE
SET created_at = excluded.created_at,
    expires_at = CASE
        WHEN suppressions.expires_at <= excluded.created_at THEN excluded.expires_at
        WHEN suppressions.expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
        ELSE greatest(suppressions.expires_at, excluded.expires_at) END,
    detail = excluded.detail, source = excluded.source, code = excluded.code,
    enhanced = excluded.enhanced, text = excluded.text, queue_id = excluded.queue_id,
    lanes = CASE
        WHEN suppressions.expires_at <= excluded.created_at OR excluded.lanes IS NULL
        THEN excluded.lanes
        ELSE (SELECT jsonb_agg(DISTINCT lane ORDER BY lane)
              FROM jsonb_array_elements_text(suppressions.lanes || excluded.lanes) AS l (lane))
        END
WHERE (suppressions.expires_at IS NOT NULL AND suppressions.expires_at <= excluded.created_at)
   OR (suppressions.lanes IS NOT NULL
       AND (excluded.lanes IS NULL OR NOT suppressions.lanes @> excluded.lanes));

-- name: expired_leases
-- A slice of deliveries whose worker stopped renewing its lease, locked for this reap. SKIP
-- LOCKED: a row locked by its worker's late record is that worker's to settle, and two
-- reapers on two hosts split the rows instead of waiting on each other. Not those of keep
-- (the reaping process itself: its own lease that ran out in an outage is its send to record).
SELECT id FROM deliveries
WHERE state = 'sending' AND lease_expires_at <= %(now)s
  AND (%(keep)s::text IS NULL OR lease_owner <> %(keep)s::text)
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
RETURNING id, queue_id, last_class, last_code, last_enhanced, last_text;

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

-- name: counts_by_lane_state
-- Depth by lane and state, the oldest creation time in each, and how many join the queue later
-- (scheduled: a scheduled recipient's created_at is its send_at) (covered by an index).
SELECT lane, state, count(*) AS n, min(created_at) AS oldest,
       count(*) FILTER (WHERE created_at > %(now)s) AS later
FROM deliveries GROUP BY lane, state;

-- name: import_message
-- An exported message, back with its id, Message-ID and content.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      size, metadata, created_at, submitter, content, send_at, expires_at)
VALUES (%(id)s, %(lane)s, %(sender)s, %(subject)s, %(message_id)s, %(scope)s,
        %(idempotency_key)s, %(size)s, %(metadata)s::jsonb, %(created_at)s, %(submitter)s,
        %(content)s, %(send_at)s, %(expires_at)s);

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

-- name: sending_by_destination
-- Deliveries being sent now, by destination.
SELECT destination, count(*) AS n FROM deliveries WHERE state = 'sending' GROUP BY destination;

-- name: insert_samples
-- Minutes' samples of lanes (the first process to record a minute wins).
INSERT INTO metric_samples (at, lane, ready, deferred, held, sending, oldest_age, sent, dead,
                            hard_bounces, paused, deferrals, soft_bounces, misconfigured,
                            bounced, complaints)
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
       paused::jsonb, deferrals, soft_bounces, misconfigured::jsonb, bounced, complaints
FROM unnest(%(at)s::float8[], %(lane)s::text[], %(ready)s::integer[], %(deferred)s::integer[],
            %(held)s::integer[], %(sending)s::integer[], %(oldest_age)s::float8[],
            %(sent)s::integer[], %(dead)s::integer[], %(hard_bounces)s::integer[],
            %(paused)s::text[], %(deferrals)s::integer[], %(soft_bounces)s::integer[],
            %(misconfigured)s::text[], %(bounced)s::integer[], %(complaints)s::integer[])
     AS s (at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
           paused, deferrals, soft_bounces, misconfigured, bounced, complaints)
ON CONFLICT (at, lane) DO NOTHING;

-- name: samples_since
-- The recorded history from a time on, oldest first.
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces,
       paused::text AS paused, deferrals, soft_bounces, misconfigured::text AS misconfigured,
       bounced, complaints
FROM metric_samples WHERE at >= %(since)s ORDER BY at, lane;

-- name: finished_between
-- Recipients delivered, dead-lettered (expired included), and hard-bounced in a time range, by
-- their events: what happened then, whatever became of them since (requeued, purged, bounced).
SELECT count(*) FILTER (WHERE type = 'sent') AS sent,
       count(*) FILTER (WHERE type IN ('dead', 'expired')) AS dead,
       count(*) FILTER (WHERE type = 'dead' AND class = 'hard_bounce') AS hard_bounces
FROM events
WHERE at >= %(start)s AND at < %(end)s AND type IN ('sent', 'dead', 'expired');

-- name: events_after
-- Events after a cursor, in (tx, id) order, of transactions that finished before every write
-- transaction of this database still running: ids are taken before commit, so a transaction
-- that took its ids earlier but commits later is read once it has committed, never behind a
-- cursor already passed. The horizon is the snapshot's oldest running transaction, leaving out
-- those pg_stat_activity shows in other databases (they write no events here); one it cannot
-- place (another user's, or one that ended meanwhile) counts, which only delays.
WITH snapshot AS (
    SELECT pg_current_snapshot() AS s
), elsewhere AS (
    SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
), horizon AS (
    SELECT coalesce(
        (SELECT running.xid
         FROM snapshot, pg_snapshot_xip(snapshot.s) AS running (xid)
         WHERE running.xid::text::bigint %% 4294967296 NOT IN (SELECT xid FROM elsewhere)
         ORDER BY running.xid LIMIT 1),
        (SELECT pg_snapshot_xmax(s) FROM snapshot)) AS tx
)
SELECT id, type, at, queue_id, recipient, lane, class, code, enhanced, text, metadata
FROM events
WHERE (tx, id) > (%(tx)s::xid8, %(after)s)
  AND tx < (SELECT tx FROM horizon)
  AND (%(any_type)s OR type = ANY(%(types)s::text[]))
ORDER BY tx, id LIMIT %(limit)s;

-- name: event_cursor
-- The position of a kept event (a cursor that names it can be followed).
SELECT tx::text AS tx, id FROM events WHERE id = %(id)s;

-- name: deliveries_for_feedback
-- The deliveries a batch of feedback is about, locked in id order: two reports of the same
-- recipient at once (a DSN and a webhook) apply one after the other, never both.
SELECT id, queue_id, address, state, destination FROM deliveries
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id
FOR UPDATE;

-- name: feedback_state
-- Recipients' states after feedback (bounced, complained), with the report as the last reply.
UPDATE deliveries AS d
SET state = f.state, last_code = f.code, last_enhanced = f.enhanced, last_text = f.text,
    last_class = coalesce(f.class, d.last_class), reason = f.reason, updated_at = %(now)s
FROM unnest(%(id)s::bigint[], %(state)s::text[], %(code)s::integer[], %(enhanced)s::text[],
            %(text)s::text[], %(class)s::text[], %(reason)s::text[])
     AS f (id, state, code, enhanced, text, class, reason)
WHERE d.id = f.id;

-- name: lock_fleet_slots
-- Taking a slot reads the destination's sends in flight, then adds one: concurrent takes of
-- the same destination queue here, or two could both see room for the last slot.
SELECT pg_advisory_xact_lock(hashtextextended('postlane.fleet:' || current_schema() || ':' || %(destination)s, 0));

-- name: share_destination_lifts
-- A deferral reads the lifts recorded of its destinations, then defers: no lift may commit in
-- between, or neither would see the other (the lift's call-back of waiting mail would not see
-- the deferral, the deferral would not see the lift). Deferrals share the lock.
SELECT pg_advisory_xact_lock_shared(hashtextextended('postlane.lifts:' || current_schema(), 0));

-- name: lock_destination_lifts
-- A lift waits for the deferrals under way, and they for it (see share_destination_lifts).
SELECT pg_advisory_xact_lock(hashtextextended('postlane.lifts:' || current_schema(), 0));

-- name: lock_destination_probe
-- Taking the probe after a pause reads who probes, then takes it: concurrent takes of the same
-- destination queue here, or two could both find it free.
SELECT pg_advisory_xact_lock(hashtextextended('postlane.probe:' || current_schema() || ':' || %(destination)s, 0));

-- name: renew_shares
-- One process's demands on destinations, for a lease.
INSERT INTO destination_shares (destination, owner, demand, since, expires_at)
SELECT destination, %(owner)s, demand, %(now)s, %(expires_at)s
FROM unnest(%(destination)s::text[], %(demand)s::float8[]) AS s (destination, demand)
ON CONFLICT (destination, owner) DO UPDATE
SET demand = excluded.demand, expires_at = excluded.expires_at;

-- name: database_clock
-- The database server's clock now (Unix seconds): hosts compare leases with their own clocks,
-- so a host's distance from it is worth knowing.
SELECT extract(epoch FROM clock_timestamp())::float8 AS now;
