-- Named queries of the SQLite store. Each is under a "-- name: NAME" header with one line saying
-- what it does; the algorithms that run them are written once, for both databases, in
-- postlane/store/sqlstore.py. Parameters are :named; an array parameter arrives as JSON text
-- and is read with json_each. A batch query runs once per row. Every column a caller reads is
-- named (aggregates carry an alias), as the PostgreSQL queries of the same name name it.

-- name: suppressed_among
-- Which of some lower-cased addresses are on the suppression list.
SELECT address FROM suppressions WHERE address IN (SELECT value FROM json_each(:addresses));

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

-- name: insert_enqueue_events
-- The events of new messages' recipients: queued, or suppressed (never attempted).
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, metadata)
SELECT CASE WHEN d.state = 'suppressed' THEN 'suppressed' ELSE 'queued' END, :now, d.queue_id,
       d.id, d.address, d.lane, m.metadata
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.queue_id IN (SELECT value FROM json_each(:ids))
ORDER BY d.id;

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
          last_class, expires_at;

-- name: claim_rest_of_messages
-- Lease the other due deliveries of messages a claim reached, so one message's recipients go
-- out in one transaction (a claim may pass its limit by the rest of one message).
UPDATE deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE queue_id IN (SELECT value FROM json_each(:queue_ids))
  AND state IN ('queued', 'deferred') AND next_attempt_at <= :now
  AND (expires_at IS NULL OR expires_at > :now)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class, expires_at;

-- name: claimed_messages
-- The stored fields and bytes of the messages a claim leased deliveries of.
SELECT id, lane, sender, message_id, idempotency_key, created_at, content
FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- name: record_outcomes
-- Apply one outcome, only if the delivery is still leased by this worker. An operator's hold
-- during the send wins over a retry; an outcome without an attempt (class NULL) keeps the
-- previous reply.
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 AND :state IN ('queued', 'deferred') THEN 'held'
                 ELSE :state END,
    attempts = :attempts, deferrals = :deferrals,
    next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0,
    last_code = CASE WHEN :class IS NULL THEN last_code ELSE :code END,
    last_enhanced = CASE WHEN :class IS NULL THEN last_enhanced ELSE :enhanced END,
    last_text = CASE WHEN :class IS NULL THEN last_text ELSE :text END,
    last_class = coalesce(:class, last_class),
    reason = :reason, updated_at = :now
WHERE id = :id AND state = 'sending' AND lease_owner = :owner
RETURNING id, queue_id, address;

-- name: insert_attempts
-- One try in a delivery's history.
INSERT INTO attempts (delivery_id, at, class, code, enhanced, text, relay, destination,
                      duration_ms, counted)
VALUES (:delivery_id, :at, :class, :code, :enhanced, :text, :relay, :destination,
        :duration_ms, :counted);

-- name: mark_done
-- Note when messages' last recipient reached a final state (for retention).
UPDATE messages SET done_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND done_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.queue_id = messages.id
                    AND d.state IN ('queued', 'sending', 'deferred', 'held'));

-- name: insert_suppression
-- Add an address to the suppression list (first reason wins).
INSERT INTO suppressions (address, created_at, source, reason, code, enhanced, text, queue_id)
VALUES (:address, :created_at, :source, :reason, :code, :enhanced, :text, :queue_id)
ON CONFLICT (address) DO NOTHING;

-- name: insert_recoveries
-- Requeued dead letters that were just delivered: their recovery time (dead to delivered).
INSERT INTO dead_letter_recoveries (queue_id, address, class, dead_at, recovered_at)
SELECT queue_id, address, 'delivered', dead_since, :now FROM deliveries
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'sent' AND dead_since IS NOT NULL;

-- name: clear_dead_since
-- Their recovery is recorded.
UPDATE deliveries SET dead_since = NULL
WHERE id IN (SELECT value FROM json_each(:ids)) AND dead_since IS NOT NULL;

-- name: renew_leases
-- Push out every lease a live worker holds.
UPDATE deliveries SET lease_expires_at = :lease_until
WHERE lease_owner = :owner AND state = 'sending';

-- name: hand_back_all
-- Return every delivery a worker holds, unattempted (graceful shutdown).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0, updated_at = :now
WHERE lease_owner = :owner AND state = 'sending';

-- name: hand_back_some
-- Return some deliveries a worker holds, unattempted.
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_owner = :owner AND state = 'sending';

-- name: expired_leases
-- Deliveries whose worker stopped renewing its lease, a slice at a time.
SELECT id FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' AND lease_expires_at <= :now
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

-- name: expire_owner_leases
-- End the leases of dead owners now, so the next reap returns their deliveries.
UPDATE deliveries SET lease_expires_at = :now
WHERE lease_owner IN (SELECT value FROM json_each(:owners)) AND state = 'sending';

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
RETURNING id, queue_id;

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

-- name: messages
-- Some messages' stored fields (not their content).
SELECT id, lane, sender, subject, message_id, idempotency_key, size, metadata, created_at,
       submitter, send_at, expires_at
FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- name: message_exists
-- Whether a message is stored.
SELECT 1 AS found FROM messages WHERE id = :id;

-- name: message_content
-- A message's stored bytes.
SELECT content FROM messages WHERE id = :id;

-- name: recipients_of
-- The recipients of some messages, each message's in the order they were given.
SELECT queue_id, id, address, domain, destination, state, attempts, next_attempt_at, last_code,
       last_enhanced, last_text, last_class, updated_at, reason
FROM deliveries WHERE queue_id IN (SELECT value FROM json_each(:ids)) ORDER BY queue_id, id;

-- name: histories_of
-- Every attempt of some deliveries, oldest first.
SELECT delivery_id, at, class, code, enhanced, text, duration_ms, relay, destination, counted
FROM attempts WHERE delivery_id IN (SELECT value FROM json_each(:ids)) ORDER BY delivery_id, id;

-- name: list_message_ids
-- The messages with a selected recipient, oldest first ({selection}: a WHERE clause over
-- deliveries d, built from a Selector).
SELECT queue_id, min(created_at) AS first_created, min(id) AS first_id FROM deliveries d
WHERE {selection}
GROUP BY queue_id ORDER BY first_created, first_id LIMIT :limit;

-- name: page_rows
-- Deliveries in arrival order after a cursor (the dashboard's queue pages; {selection} narrows).
SELECT d.id, d.queue_id FROM deliveries d
WHERE d.id > :after AND {selection}
ORDER BY d.id LIMIT :limit;

-- name: counts_by_lane_state
-- Depth by lane and state, and the oldest creation time in each (covered by an index).
SELECT lane, state, count(*) AS n, min(created_at) AS oldest
FROM deliveries INDEXED BY deliveries_lane_state
GROUP BY lane, state;

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
ORDER BY d.updated_at DESC, d.id LIMIT :limit;

-- name: dead_letters_of
-- The dead recipients of one message, as dead_letters gives them.
SELECT d.id, d.queue_id, d.address, d.domain, d.destination, d.lane, d.attempts,
       d.last_class, d.updated_at, d.last_code, d.last_enhanced, d.last_text, d.reason,
       m.sender, m.subject,
       (SELECT relay FROM attempts a WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1)
           AS relay
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.queue_id = :id AND d.state = 'dead'
ORDER BY d.id;

-- name: select_delivery_ids
-- A slice of the selected deliveries, in id order from just above :after ({selection} as
-- above): bulk actions walk a selection in such slices.
SELECT d.id FROM deliveries d
WHERE {selection} AND d.id > :after
ORDER BY d.id LIMIT :limit;

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
    SELECT domain, sum(n) AS total FROM counts
    GROUP BY domain ORDER BY total DESC, domain LIMIT :limit
)
SELECT c.domain, t.total, c.bucket, c.n
FROM counts c JOIN totals t ON t.domain = c.domain
ORDER BY t.total DESC, c.domain, c.bucket;

-- name: flush
-- Make queued or deferred deliveries due now (postqueue -f).
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, updated_at = :now, reason = 'flushed'
WHERE id IN (SELECT value FROM json_each(:ids)) AND state IN ('queued', 'deferred');

-- name: hold
-- Hold queued or deferred deliveries (postsuper -h).
UPDATE deliveries SET state = 'held', updated_at = :now, reason = 'held by an operator'
WHERE id IN (SELECT value FROM json_each(:ids)) AND state IN ('queued', 'deferred');

-- name: hold_after_send
-- A delivery being sent is held once its try is recorded (unless it was delivered).
UPDATE deliveries SET hold_after = 1
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'sending';

-- name: release
-- Release held deliveries, due now (postsuper -H).
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, updated_at = :now, reason = 'released'
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'held';

-- name: release_after_send
-- Cancel a pending hold of a delivery being sent.
UPDATE deliveries SET hold_after = 0
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'sending';

-- name: delete_deliveries
-- Remove deliveries still in the given states (one a worker claimed meanwhile is left alone);
-- their attempts go with them (ON DELETE CASCADE).
DELETE FROM deliveries
WHERE id IN (SELECT value FROM json_each(:ids)) AND state IN (SELECT value FROM json_each(:states))
RETURNING queue_id;

-- name: delete_empty_messages
-- Remove messages none of whose recipients is left.
DELETE FROM messages
WHERE id IN (SELECT value FROM json_each(:ids))
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.id);

-- name: requeue_dead
-- Dead deliveries start afresh: no attempts used, due now, max_age counted from now. Each
-- remembers when it died (dead_since: updated_at before this update), for the recovery time.
UPDATE deliveries
SET state = 'queued', attempts = 0, deferrals = 0, next_attempt_at = :now, created_at = :now,
    dead_since = updated_at, updated_at = :now, reason = 'requeued from the dead-letter queue'
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'dead'
RETURNING id, queue_id, dead_since AS dead_at;

-- name: reopen_messages
-- Messages with a recipient waiting again are not finished.
UPDATE messages SET done_at = NULL
WHERE id IN (SELECT value FROM json_each(:ids)) AND done_at IS NOT NULL;

-- name: export_recipients
-- Some deliveries, everything about them, in id order.
SELECT queue_id, id, address, domain, destination, state, attempts, deferrals,
       next_attempt_at, created_at, last_code, last_enhanced, last_text, last_class, reason
FROM deliveries WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id;

-- name: messages_with_content
-- Some messages' stored fields and bytes.
SELECT id, lane, sender, subject, message_id, idempotency_key, metadata, created_at, content
FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- name: message_or_key
-- Whether a message id is stored, and whether its submitter's idempotency key is held.
SELECT EXISTS (SELECT 1 FROM messages WHERE id = :id) AS message_exists,
       EXISTS (SELECT 1 FROM messages
               WHERE idempotency_scope = :scope AND idempotency_key = :key) AS key_held;

-- name: import_message
-- An exported message, back with its id, Message-ID and content.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_scope, idempotency_key,
                      size, metadata, created_at, submitter, content)
VALUES (:id, :lane, :sender, :subject, :message_id, :scope, :idempotency_key, :size, :metadata,
        :created_at, :submitter, :content);

-- name: delivery_exists
-- Whether a message already has a recipient (import skips it).
SELECT 1 AS found FROM deliveries WHERE queue_id = :queue_id AND lower(address) = lower(:address);

-- name: import_delivery
-- An exported recipient, back with its state and history.
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        attempts, deferrals, next_attempt_at, last_code, last_enhanced,
                        last_text, last_class, reason, updated_at)
VALUES (:queue_id, :address, :domain, :destination, :lane, :created_at, :state, :attempts,
        :deferrals, :next_attempt_at, :code, :enhanced, :text, :class, :reason, :now)
RETURNING id;

-- name: defer_unattempted
-- Hand a leased delivery back to wait until a given time, without an attempt (a destination
-- that cannot take it now: rate, concurrency, pause).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held'
                 WHEN :next_attempt_at > :now THEN 'deferred' ELSE 'queued' END,
    next_attempt_at = :next_attempt_at, lease_owner = NULL, lease_expires_at = NULL,
    hold_after = 0, reason = :reason, updated_at = :now
WHERE id = :id AND lease_owner = :owner AND state = 'sending';

-- name: defer_destination
-- Push every waiting delivery of a paused destination to the end of its pause, so claims do
-- not walk over them meanwhile (uses deliveries_destination).
UPDATE deliveries
SET next_attempt_at = :until, reason = :reason, updated_at = :now
WHERE destination = :destination AND state IN ('queued', 'deferred')
  AND next_attempt_at < :until;

-- name: hasten_destination
-- Call back a destination's deliveries that wait for a slot, to be spaced at its new rate.
UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
WHERE destination = :destination AND state IN ('queued', 'deferred')
  AND next_attempt_at > :now AND reason = :reason;

-- name: hasten_all
-- Call back every delivery that waits for a slot (the relay's rate grew).
UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
WHERE state IN ('queued', 'deferred') AND next_attempt_at > :now AND reason = :reason;

-- name: save_destination_states
-- Record a destination's pause and rate (upsert).
INSERT INTO destination_state (destination, rate, paused_until, reason, updated_at)
VALUES (:destination, :rate, :paused_until, :reason, :updated_at)
ON CONFLICT (destination) DO UPDATE
SET rate = excluded.rate, paused_until = excluded.paused_until, reason = excluded.reason,
    updated_at = excluded.updated_at;

-- name: destination_states
-- Every destination's recorded pause and rate.
SELECT destination, rate, paused_until, reason, updated_at FROM destination_state
ORDER BY destination;

-- name: sending_by_destination
-- Deliveries being sent now, by destination.
SELECT destination, count(*) AS n FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' GROUP BY destination;

-- name: lift_destinations
-- An operator's flush ends some destinations' pauses and slow-downs.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now
WHERE destination IN (SELECT value FROM json_each(:destinations));

-- name: lift_all_destinations
-- An operator's flush of everything ends every pause and slow-down; returns the destinations.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now
RETURNING destination;

-- name: flush_destinations
-- A flush makes the deferred deliveries of these destinations due now.
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, reason = 'flushed', updated_at = :now
WHERE destination IN (SELECT value FROM json_each(:destinations))
  AND state IN ('queued', 'deferred') AND next_attempt_at > :now;

-- name: insert_samples
-- One minute's sample of a lane (the first process to record a minute wins).
INSERT INTO metric_samples (at, lane, ready, deferred, held, sending, oldest_age, sent, dead,
                            hard_bounces, paused, deferrals, soft_bounces)
VALUES (:at, :lane, :ready, :deferred, :held, :sending, :oldest_age, :sent, :dead,
        :hard_bounces, :paused, :deferrals, :soft_bounces)
ON CONFLICT (at, lane) DO NOTHING;

-- name: samples_since
-- The recorded history from a time on, oldest first.
SELECT at, lane, ready, deferred, held, sending, oldest_age, sent, dead, hard_bounces, paused,
       deferrals, soft_bounces
FROM metric_samples WHERE at >= :since ORDER BY at, lane;

-- name: purge_samples
-- Forget history older than the retention.
DELETE FROM metric_samples WHERE at < :before;

-- name: finished_between
-- Recipients delivered, dead-lettered, and hard-bounced in a time range.
SELECT (SELECT count(*) FROM deliveries INDEXED BY deliveries_sent_at
        WHERE state = 'sent' AND updated_at >= :start AND updated_at < :end) AS sent,
       count(*) AS dead, coalesce(sum(last_class = 'hard_bounce'), 0) AS hard_bounces
FROM deliveries INDEXED BY deliveries_dead
WHERE state = 'dead' AND updated_at >= :start AND updated_at < :end;

-- name: recoveries_after
-- Dead letters requeued since a row id (for the recovery-time histogram).
SELECT id, recovered_at - dead_at AS seconds FROM dead_letter_recoveries
WHERE id > :after ORDER BY id;

-- name: alert_fire
-- An alert starts firing: a change only for the process that made it.
INSERT INTO alert_state (name, firing, since, updated_at) VALUES (:name, 1, :now, :now)
ON CONFLICT (name) DO UPDATE SET firing = 1, since = :now, updated_at = :now
WHERE alert_state.firing = 0;

-- name: alert_resolve
-- A firing alert resolves: a change only for the process that made it.
UPDATE alert_state SET firing = 0, since = :now, updated_at = :now
WHERE name = :name AND firing = 1;

-- name: alerts_firing
-- Alerts recorded as firing, with since when.
SELECT name, since FROM alert_state WHERE firing = 1 ORDER BY name;

-- name: attempt_classes_between
-- Attempts in a time range, by class (a minute's deferrals and soft bounces).
SELECT class, count(*) AS n FROM attempts WHERE at >= :start AND at < :end GROUP BY class;

-- name: destination_replies_since
-- Recent attempts by destination and class (the dashboard's destinations page).
SELECT destination, class, count(*) AS n FROM attempts WHERE at >= :since
GROUP BY destination, class;

-- name: suppressions
-- The suppression list, newest first.
SELECT address, created_at, source, reason, code, enhanced, text, queue_id
FROM suppressions ORDER BY created_at DESC, address LIMIT :limit;

-- name: delete_suppression
-- Take an address off the suppression list.
DELETE FROM suppressions WHERE address = :address;

-- name: events_after
-- Events after a cursor, in order (one writer: ids are in commit order).
SELECT id, type, at, queue_id, recipient, lane, class, code, enhanced, text, metadata
FROM events
WHERE id > :after AND (:any_type OR type IN (SELECT value FROM json_each(:types)))
ORDER BY id LIMIT :limit;

-- name: event_cursor
-- The position of a kept event (a cursor that names it can be followed).
SELECT 0 AS tx, id FROM events WHERE id = :id;

-- name: purge_events
-- Forget events older than their retention.
DELETE FROM events WHERE at < :before;
