-- Named queries of the SQLite store. Each is under a "-- name: NAME" header with one line saying
-- what it does; postlane.store.sqlite loads them at import. Parameters are :named.

-- name: insert_message
-- Store a message's content and headers once, whatever its number of recipients.
INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_key, size, metadata,
                      created_at, done_at, submitter, content)
VALUES (:id, :lane, :sender, :subject, :message_id, :idempotency_key, :size, :metadata,
        :created_at, :done_at, :submitter, :content);

-- name: message_by_idempotency_key
-- The first message stored under an idempotency key.
SELECT id FROM messages WHERE idempotency_key = :key;

-- name: insert_delivery
-- One recipient of a new message.
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        next_attempt_at, updated_at, reason)
VALUES (:queue_id, :address, :domain, :destination, :lane, :created_at, :state,
        :created_at, :created_at, :reason);

-- name: claim_lane
-- Lease the oldest due deliveries of one lane. The subquery walks deliveries_due in
-- next_attempt_at order and stops after :limit rows.
UPDATE deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE id IN (
    SELECT id FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = :lane AND next_attempt_at <= :now
    ORDER BY next_attempt_at
    LIMIT :limit
)
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class;

-- name: record_outcome
-- Apply one outcome, only if the delivery is still leased by this worker. An operator's hold
-- during the send wins over a retry.
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
RETURNING queue_id, address;

-- name: insert_attempt
-- One try in a delivery's history.
INSERT INTO attempts (delivery_id, at, class, code, enhanced, text, relay, destination,
                      duration_ms, counted)
VALUES (:delivery_id, :at, :class, :code, :enhanced, :text, :relay, :destination,
        :duration_ms, :counted);

-- name: mark_done
-- Note when a message's last recipient reached a final state (for retention).
UPDATE messages SET done_at = :now
WHERE id = :queue_id AND done_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries
                  WHERE queue_id = :queue_id
                    AND state IN ('queued', 'sending', 'deferred', 'held'));

-- name: insert_suppression
-- Add an address to the suppression list (first reason wins).
INSERT INTO suppressions (address, created_at, source, reason, code, enhanced, text, queue_id)
VALUES (:address, :created_at, :source, :reason, :code, :enhanced, :text, :queue_id)
ON CONFLICT (address) DO NOTHING;

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

-- name: hand_back_one
-- Return one delivery a worker holds, unattempted.
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0, updated_at = :now
WHERE id = :id AND lease_owner = :owner AND state = 'sending';

-- name: expired_leases
-- Deliveries whose worker stopped renewing its lease.
SELECT id, lease_owner, destination FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' AND lease_expires_at <= :now
LIMIT 1000;

-- name: reap_lease
-- Make a delivery with an expired lease due now; the try counts (it may have been sent).
UPDATE deliveries
SET state = CASE WHEN hold_after = 1 THEN 'held' ELSE 'queued' END,
    attempts = attempts + 1, next_attempt_at = :now,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = 0,
    last_code = NULL, last_enhanced = NULL, last_text = :text, last_class = 'temporary',
    reason = 'lease expired', updated_at = :now
WHERE id = :id AND state = 'sending' AND lease_expires_at <= :now;

-- name: expire_owner_leases
-- End the leases of a dead owner now, so the next reap returns its deliveries.
UPDATE deliveries SET lease_expires_at = :now
WHERE lease_owner = :owner AND state = 'sending';

-- name: lease_owners
-- Workers that hold leases.
SELECT DISTINCT lease_owner FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' AND lease_owner IS NOT NULL;

-- name: next_due_at
-- The earliest next attempt time of any waiting delivery.
SELECT min(next_at) FROM (
    SELECT min(next_attempt_at) AS next_at FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'high'
    UNION ALL
    SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'normal'
    UNION ALL
    SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_due
    WHERE state IN ('queued', 'deferred') AND lane = 'low'
);

-- name: finished_messages
-- Messages past their retention: all recipients final, none dead (dead letters have their own).
SELECT id FROM messages INDEXED BY messages_done
WHERE done_at <= :cutoff
  AND (done_at <= :dead_cutoff
       OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.id
                      AND d.state = 'dead'))
LIMIT 500;

-- name: delete_message
-- Remove a message; its deliveries and attempts go with it (ON DELETE CASCADE).
DELETE FROM messages WHERE id = :id;

-- name: message
-- One message's stored fields (not its content).
SELECT id, lane, sender, subject, message_id, idempotency_key, size, metadata, created_at,
       submitter
FROM messages WHERE id = :id;

-- name: message_content
-- A message's stored bytes.
SELECT content FROM messages WHERE id = :id;

-- name: message_recipients
-- The recipients of one message, in the order they were given.
SELECT id, address, domain, destination, state, attempts, next_attempt_at, last_code,
       last_enhanced, last_text, last_class, updated_at, reason
FROM deliveries WHERE queue_id = :id ORDER BY id;

-- name: delivery_history
-- Every attempt of one delivery, oldest first.
SELECT at, class, code, enhanced, text, duration_ms, relay, destination, counted
FROM attempts WHERE delivery_id = :id ORDER BY id;

-- name: counts_by_lane_state
-- Depth by lane and state, and the oldest creation time in each (covered by an index).
SELECT lane, state, count(*), min(created_at)
FROM deliveries INDEXED BY deliveries_lane_state
GROUP BY lane, state;

-- name: suppression_count
-- How many addresses are on the suppression list.
SELECT count(*) FROM suppressions;

-- name: suppressions
-- The suppression list, newest first.
SELECT address, created_at, source, reason, code, enhanced, text, queue_id
FROM suppressions ORDER BY created_at DESC LIMIT :limit;

-- name: delete_suppression
-- Take an address off the suppression list.
DELETE FROM suppressions WHERE address = :address;

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

-- name: delete_empty_message
-- Remove a message none of whose recipients is left.
DELETE FROM messages
WHERE id = :queue_id AND NOT EXISTS (SELECT 1 FROM deliveries WHERE queue_id = :queue_id);

-- name: dead_for_requeue
-- The dead deliveries among some ids, with when they died.
SELECT id, queue_id, address, last_class, updated_at FROM deliveries
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'dead';

-- name: requeue_dead
-- A dead delivery starts afresh: no attempts used, due now, max_age counted from now; it
-- remembers when it died, for the recovery time once it is delivered.
UPDATE deliveries
SET state = 'queued', attempts = 0, deferrals = 0, next_attempt_at = :now, created_at = :now,
    dead_since = updated_at, updated_at = :now, reason = 'requeued from the dead-letter queue'
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'dead';

-- name: reopen_message
-- A message with a recipient waiting again is not finished.
UPDATE messages SET done_at = NULL WHERE id = :queue_id;

-- name: insert_recovery
-- A requeued dead letter was delivered (recovery time = recovered_at - dead_at).
INSERT INTO dead_letter_recoveries (queue_id, address, class, dead_at, recovered_at)
SELECT queue_id, address, 'delivered', dead_since, :now FROM deliveries
WHERE id = :id AND dead_since IS NOT NULL;

-- name: clear_dead_since
-- The recovery is recorded.
UPDATE deliveries SET dead_since = NULL WHERE id = :id AND dead_since IS NOT NULL;

-- name: export_recipients
-- The selected recipients of one message, everything about them.
SELECT id, address, domain, destination, state, attempts, deferrals, next_attempt_at,
       created_at, last_code, last_enhanced, last_text, last_class, reason
FROM deliveries WHERE queue_id = :queue_id AND id IN (SELECT value FROM json_each(:ids))
ORDER BY id;

-- name: message_with_content
-- A message's stored fields and bytes.
SELECT id, lane, sender, subject, message_id, idempotency_key, size, metadata, created_at, content
FROM messages WHERE id = :id;

-- name: queue_ids_of
-- The messages of some deliveries.
SELECT DISTINCT queue_id FROM deliveries WHERE id IN (SELECT value FROM json_each(:ids));

-- name: delivery_exists
-- Whether a message already has a recipient (import skips it).
SELECT 1 FROM deliveries WHERE queue_id = :queue_id AND lower(address) = lower(:address);

-- name: import_delivery
-- An exported recipient, back with its state and history.
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        attempts, deferrals, next_attempt_at, last_code, last_enhanced,
                        last_text, last_class, reason, updated_at)
VALUES (:queue_id, :address, :domain, :destination, :lane, :created_at, :state, :attempts,
        :deferrals, :next_attempt_at, :code, :enhanced, :text, :class, :reason, :now)
RETURNING id;

-- name: claim_rest_of_messages
-- Lease the other due deliveries of messages a claim reached, so one message's recipients go
-- out in one transaction (a claim may pass its limit by the rest of one message).
UPDATE deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE queue_id IN (SELECT value FROM json_each(:queue_ids))
  AND state IN ('queued', 'deferred') AND next_attempt_at <= :now
RETURNING id, queue_id, address, domain, destination, attempts, deferrals, created_at,
          last_class;

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

-- name: flush_destinations
-- A flush makes the deferred deliveries of these destinations due now.
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, reason = 'flushed', updated_at = :now
WHERE destination IN (SELECT value FROM json_each(:destinations))
  AND state IN ('queued', 'deferred') AND next_attempt_at > :now;

-- name: save_destination_state
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

-- name: lift_destination
-- An operator's flush ends a destination's pause and slow-down.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now
WHERE destination = :destination;

-- name: lift_all_destinations
-- An operator's flush of everything ends every pause and slow-down.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now;

-- name: sending_by_destination
-- Deliveries being sent now, by destination.
SELECT destination, count(*) FROM deliveries INDEXED BY deliveries_leased
WHERE state = 'sending' GROUP BY destination;

-- name: hasten_destination
-- Call back a destination's deliveries that wait for a slot, to be spaced at its new rate.
UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
WHERE destination = :destination AND state IN ('queued', 'deferred')
  AND next_attempt_at > :now AND reason = :reason;

-- name: hasten_all
-- Call back every delivery that waits for a slot (the relay's rate grew).
UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
WHERE state IN ('queued', 'deferred') AND next_attempt_at > :now AND reason = :reason;

-- name: insert_sample
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

-- name: sent_between
-- Recipients delivered in a time range.
SELECT count(*) FROM deliveries INDEXED BY deliveries_sent_at
WHERE state = 'sent' AND updated_at >= :start AND updated_at < :end;

-- name: dead_between
-- Recipients dead-lettered in a time range, and how many of them were hard bounces.
SELECT count(*), coalesce(sum(last_class = 'hard_bounce'), 0)
FROM deliveries INDEXED BY deliveries_dead
WHERE state = 'dead' AND updated_at >= :start AND updated_at < :end;

-- name: recoveries_after
-- Dead letters requeued since a row id (for the recovery-time histogram).
SELECT id, recovered_at - dead_at FROM dead_letter_recoveries WHERE id > :after ORDER BY id;

-- name: alert_fire
-- An alert starts firing: true only for the process that made the change.
INSERT INTO alert_state (name, firing, since, updated_at) VALUES (:name, 1, :now, :now)
ON CONFLICT (name) DO UPDATE SET firing = 1, since = :now, updated_at = :now
WHERE alert_state.firing = 0;

-- name: alert_resolve
-- A firing alert resolves: true only for the process that made the change.
UPDATE alert_state SET firing = 0, since = :now, updated_at = :now
WHERE name = :name AND firing = 1;

-- name: alerts_firing
-- Alerts recorded as firing, with since when.
SELECT name, since FROM alert_state WHERE firing = 1 ORDER BY name;

-- name: attempt_classes_between
-- Attempts in a time range, by class (a minute's deferrals and soft bounces).
SELECT class, count(*) FROM attempts WHERE at >= :start AND at < :end GROUP BY class;

-- name: destination_replies_since
-- Recent attempts by destination and class (the dashboard's destinations page).
SELECT destination, class, count(*) FROM attempts WHERE at >= :since
GROUP BY destination, class;

-- name: page_rows
-- Deliveries in arrival order after a cursor (the dashboard's queue pages; {selection} narrows).
SELECT d.id, d.queue_id FROM deliveries d
WHERE d.id > :after AND {selection}
ORDER BY d.id LIMIT :limit;
