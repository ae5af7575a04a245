-- Named queries of the SQLite store. Each is under a "-- name: NAME" header with one line saying
-- what it does; the algorithms that run them are written once, for both databases, in
-- postlane/store/sqlstore.py. Parameters are :named; an array parameter arrives as JSON text
-- and is read with json_each. A batch query runs once per row. Every column a caller reads is
-- named (aggregates carry an alias), as the PostgreSQL queries of the same name name it.

-- name: insert_messages
-- Store a new message (content once per message, whatever its number of recipients); one whose
-- submitter already stored its idempotency key is skipped (the unique key, not a
-- check-then-insert).
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      fingerprint, size, metadata, created_at, send_at, expires_at, done_at,
                      submitter, content)
VALUES (:id, :lane, :sender, :subject, :message_id, :idempotency_scope, :idempotency_key,
        :fingerprint, :size, :metadata, :created_at, :send_at, :expires_at, :done_at,
        :submitter, :content)
ON CONFLICT (idempotency_scope, idempotency_key) DO NOTHING
RETURNING id;

-- name: messages_by_idempotency_key
-- The message first stored under one submitter's idempotency key, and its payload's digest.
SELECT idempotency_scope, idempotency_key, id, fingerprint FROM messages
WHERE idempotency_scope = :scope AND idempotency_key = :key;

-- name: insert_deliveries
-- One recipient of a new message, due at once or at its send_at (or suppressed, never
-- attempted).
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        next_attempt_at, expires_at, updated_at, reason)
VALUES (:queue_id, :address, :domain, :destination, :lane, :created_at, :state,
        :next_attempt_at, :expires_at, :created_at, :reason);

-- name: insert_events
-- One event of a delivery, with its message's lane and metadata.
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, class, code, enhanced,
                    text, metadata)
SELECT :type, :at, d.queue_id, d.id, d.address, d.lane, :class, :code, :enhanced, :text,
       m.metadata
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.id = :delivery_id;

-- name: claim_lane
-- Lease the oldest due deliveries of one lane. The subquery walks deliveries_due in
-- next_attempt_at order and stops after :limit rows.
UPDATE deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE id IN (
    SELECT id FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = :lane AND next_attempt_at <= :now
      AND (expires_at IS NULL OR expires_at > :now)
    ORDER BY next_attempt_at
    LIMIT :limit
)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class, expires_at, reason = 'flushed' AS flushed;

-- name: claim_rest_of_messages
-- Lease the other due deliveries of messages a claim reached, so one message's recipients go
-- out in one transaction (a claim may pass its limit by the rest of one message).
UPDATE deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE queue_id IN (SELECT value FROM json_each(:queue_ids))
  AND state IN ('queued', 'deferred') AND next_attempt_at <= :now
  AND (expires_at IS NULL OR expires_at > :now)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class, expires_at, reason = 'flushed' AS flushed;

-- name: record_outcomes
-- Apply one outcome, only if the delivery is still leased by this worker. An operator's hold
-- during the send wins over a retry; an outcome without an attempt (text NULL) keeps the
-- previous reply, and its class unless it gives one (what held a never-tried one back).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 AND :state IN ('queued', 'deferred') THEN 'held'
                 ELSE :state END,
    attempts = :attempts, deferrals = :deferrals,
    next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0,
    last_code = CASE WHEN :text IS NULL THEN last_code ELSE :code END,
    last_enhanced = CASE WHEN :text IS NULL THEN last_enhanced ELSE :enhanced END,
    last_text = coalesce(:text, last_text),
    last_class = coalesce(:class, last_class),
    reason = :reason, updated_at = :now
WHERE id = :id AND state = 'sending' AND lease_owner = :owner
RETURNING id, queue_id, address, dead_since;

-- name: insert_suppression
-- Add an address to the suppression list in a scope, for a reason (each reason an entry of its
-- own: removing a mistaken hard bounce leaves the recipient's unsubscribe). The first entry
-- wins, unless it expired (then replaced) or the new one, for the same reason, stops lanes it
-- does not (an unsubscribe from one kind of mail, then from another): then it is widened to
-- every lane (lanes NULL) or to both's lanes, lasts as long as the longer of the two (stopping
-- less, for less long, would undo what the recipient asked), and takes the new one's detail
-- and reply.
INSERT INTO suppressions (address, scope, reason, created_at, expires_at, detail, source, code,
                          enhanced, text, queue_id, lanes)
VALUES (:address, :scope, :reason, :created_at, :expires_at, :detail, :source, :code, :enhanced,
        :text, :queue_id, :lanes)
ON CONFLICT (address, scope, reason) DO UPDATE
SET created_at = excluded.created_at,
    expires_at = CASE
        WHEN suppressions.expires_at <= excluded.created_at THEN excluded.expires_at
        WHEN suppressions.expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
        ELSE max(suppressions.expires_at, excluded.expires_at) END,
    detail = excluded.detail, source = excluded.source, code = excluded.code,
    enhanced = excluded.enhanced, text = excluded.text, queue_id = excluded.queue_id,
    lanes = CASE
        WHEN suppressions.expires_at <= excluded.created_at OR excluded.lanes IS NULL
        THEN excluded.lanes
        ELSE (SELECT json_group_array(value)
              FROM (SELECT value FROM json_each(suppressions.lanes)
                    UNION SELECT value FROM json_each(excluded.lanes))) END
WHERE (suppressions.expires_at IS NOT NULL AND suppressions.expires_at <= excluded.created_at)
   OR (suppressions.lanes IS NOT NULL
       AND (excluded.lanes IS NULL
            OR EXISTS (SELECT 1 FROM json_each(excluded.lanes) AS asked
                       WHERE asked.value NOT IN (SELECT value
                                                 FROM json_each(suppressions.lanes)))));

-- name: expired_leases
-- Deliveries whose worker stopped renewing its lease, a slice at a time; not those of :keep
-- (the reaping process itself: it renews its own while it lives, and a lease of its own that
-- ran out while the store could not answer is still its send to record).
SELECT id FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' AND lease_expires_at <= :now
  AND (:keep IS NULL OR lease_owner <> :keep)
LIMIT :limit;

-- name: reap_leases
-- Make deliveries with an expired lease due now; the try counts (it may have been sent).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held' ELSE 'queued' END,
    attempts = attempts + 1, next_attempt_at = :now,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0,
    last_code = NULL, last_enhanced = NULL,
    last_text = 'worker ' || lease_owner || ' stopped without recording a result (lease expired)',
    last_class = 'temporary', reason = 'lease expired', updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids))
  AND state = 'sending' AND lease_expires_at <= :now
RETURNING id, destination, last_text;

-- name: lease_owners
-- Workers that hold leases.
SELECT DISTINCT lease_owner FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' AND lease_owner IS NOT NULL
ORDER BY lease_owner;

-- name: next_due_at
-- The earliest next attempt time of any waiting delivery: one index probe per lane.
SELECT min(next_at) AS next_at FROM (
    SELECT min(next_attempt_at) AS next_at FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'high'
    UNION ALL
    SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'normal'
    UNION ALL
    SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'low'
);

-- name: expire_deliveries
-- A slice of waiting deliveries whose time ran out: dead, never sent late.
UPDATE deliveries
SET state = 'dead', reason = 'expired', lease_owner = NULL, lease_expires_at = NULL,
    hold_after = 0, updated_at = :now
WHERE id IN (
    SELECT id FROM deliveries INDEXED BY deliveries_expiring
    WHERE expires_at IS NOT NULL AND expires_at <= :now
      AND state IN ('queued', 'deferred', 'held')
    LIMIT :limit
)
RETURNING id, queue_id, last_class, last_code, last_enhanced, last_text;

-- name: purge_finished
-- Remove a slice of messages past their retention (all recipients final; dead letters kept for
-- their own retention); deliveries and attempts go with them (ON DELETE CASCADE).
DELETE FROM messages
WHERE id IN (
    SELECT id FROM messages INDEXED BY messages_done
    WHERE done_at <= :cutoff
      AND (done_at <= :dead_cutoff
           OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.id
                          AND d.state = 'dead'))
    LIMIT :limit
)
RETURNING id;

-- name: counts_by_lane_state
-- Depth by lane and state, the oldest creation time in each, and how many join the queue later
-- (scheduled: a scheduled recipient's created_at is its send_at) (covered by an index).
SELECT lane, state, count(*) AS n, min(created_at) AS oldest,
       sum(created_at > :now) AS later
FROM deliveries INDEXED BY deliveries_lane_state
GROUP BY lane, state;

-- name: import_message
-- An exported message, back with its id, Message-ID and content.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      size, metadata, created_at, submitter, content, send_at, expires_at)
VALUES (:id, :lane, :sender, :subject, :message_id, :scope, :idempotency_key, :size, :metadata,
        :created_at, :submitter, :content, :send_at, :expires_at);

-- name: defer_unattempted
-- Hand a leased delivery back to wait until a given time, without an attempt (a destination
-- that cannot take it now: rate, concurrency, pause).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held'
                 WHEN :next_attempt_at > :now THEN 'deferred' ELSE 'queued' END,
    next_attempt_at = :next_attempt_at, lease_owner = NULL, lease_expires_at = NULL,
    hold_after = 0, reason = :reason, updated_at = :now
WHERE id = :id AND lease_owner = :owner AND state = 'sending';

-- name: sending_by_destination
-- Deliveries being sent now, by destination.
SELECT destination, count(*) AS n FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' GROUP BY destination;

-- name: insert_samples
-- One minute's sample of a lane (the first process to record a minute wins).
INSERT INTO metric_samples (at, lane, ready, deferred, held, sending, oldest_age, sent, dead,
                            hard_bounces, paused, deferrals, soft_bounces, misconfigured,
                            bounced, complaints)
VALUES (:at, :lane, :ready, :deferred, :held, :sending, :oldest_age, :sent, :dead,
        :hard_bounces, :paused, :deferrals, :soft_bounces, :misconfigured, :bounced,
        :complaints)
ON CONFLICT (at, lane) DO NOTHING;

-- name: samples_since
-- The recorded history from a time on, oldest first.
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces, paused,
       deferrals, soft_bounces, misconfigured, bounced, complaints
FROM metric_samples WHERE at >= :since ORDER BY at, lane;

-- name: finished_between
-- Recipients delivered, dead-lettered (expired included), and hard-bounced in a time range, by
-- their events: what happened then, whatever became of them since (requeued, purged, bounced).
SELECT coalesce(sum(type = 'sent'), 0) AS sent,
       coalesce(sum(type IN ('dead', 'expired')), 0) AS dead,
       coalesce(sum(type = 'dead' AND class = 'hard_bounce'), 0) AS hard_bounces
FROM events INDEXED BY events_at
WHERE at >= :start AND at < :end AND type IN ('sent', 'dead', 'expired');

-- name: events_after
-- Events after a cursor, in order (one writer: ids are in commit order).
SELECT id, type, at, queue_id, recipient, lane, class, code, enhanced, text, metadata
FROM events
WHERE id > :after AND (:any_type OR type IN (SELECT value FROM json_each(:types)))
ORDER BY id LIMIT :limit;

-- name: event_cursor
-- The position of a kept event (a cursor that names it can be followed).
SELECT 0 AS tx, id FROM events WHERE id = :id;

-- name: deliveries_for_feedback
-- The deliveries a batch of feedback is about (one writer: nothing else changes them meanwhile).
SELECT id, queue_id, address, state, destination FROM deliveries
WHERE id IN (SELECT value FROM json_each(:ids));

-- name: feedback_state
-- A recipient's state after feedback (bounced, complained), with the report as its last reply.
UPDATE deliveries
SET state = :state, last_code = :code, last_enhanced = :enhanced, last_text = :text,
    last_class = coalesce(:class, last_class), reason = :reason, updated_at = :now
WHERE id = :id;

-- name: renew_shares
-- One process's demand on a destination, for a lease.
INSERT INTO destination_shares (destination, owner, demand, since, expires_at)
VALUES (:destination, :owner, :demand, :now, :expires_at)
ON CONFLICT (destination, owner) DO UPDATE
SET demand = excluded.demand, expires_at = excluded.expires_at;

-- name: database_clock
-- The database's clock: none of its own (the file is this host's, and so is the clock).
SELECT NULL AS now;
