-- Named queries both databases run as they are written here. Each is under a "-- name: NAME"
-- header with one line saying what it does; the algorithms that run them are written once, in
-- postlane/store/*.py. Parameters are :named (PostgreSQL's dialect turns them into psycopg's
-- %(named)s); @any(column, parameter, type) is "column is one of the array parameter's values"
-- in each database's own form (json_each in SQLite, = ANY(array) in PostgreSQL), and
-- @rows(parameter type, ...) a batch's rows as an INSERT takes them (VALUES run once per row in
-- SQLite, unnest of one array per column in PostgreSQL). Booleans are
-- written TRUE and FALSE, which SQLite reads as 1 and 0. A query only one database can run as
-- written lives in that database's folder under the same kind of header.

-- name: any_suppression
-- Whether the suppression list holds anything (enqueues skip the look-up while it is empty).
SELECT 1 AS found FROM suppressions LIMIT 1;

-- name: suppressed_among
-- Active suppressions of some lower-cased addresses, with their scopes and lanes (a NULL :now:
-- any).
SELECT address, scope, reason, lanes FROM suppressions
WHERE @any(address, addresses, text) AND coalesce(expires_at > :now, TRUE);

-- name: insert_enqueue_events
-- The events of new messages' recipients: queued, or suppressed (never attempted), at the time
-- they joined the queue.
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, metadata)
SELECT CASE WHEN d.state = 'suppressed' THEN 'suppressed' ELSE 'queued' END, m.created_at,
       d.queue_id, d.id, d.address, d.lane, m.metadata
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE @any(d.queue_id, ids, text)
ORDER BY d.id;

-- name: claimed_messages
-- The stored fields and bytes of the messages a claim leased deliveries of.
SELECT id, lane, sender, message_id, idempotency_key, created_at, content
FROM messages WHERE @any(id, ids, text);

-- name: mark_done
-- Note when messages' last recipient reached a final state (for retention).
UPDATE messages SET done_at = :now
WHERE @any(id, ids, text) AND done_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.queue_id = messages.id
                    AND d.state IN ('queued', 'sending', 'deferred', 'held'));

-- name: insert_recoveries
-- Requeued dead letters that were just delivered: their recovery time (dead to delivered).
INSERT INTO dead_letter_recoveries (queue_id, address, class, dead_at, recovered_at)
SELECT queue_id, address, 'delivered', dead_since, :now FROM deliveries
WHERE @any(id, ids, bigint) AND state = 'sent' AND dead_since IS NOT NULL;

-- name: clear_dead_since
-- Their recovery is recorded.
UPDATE deliveries SET dead_since = NULL
WHERE @any(id, ids, bigint) AND dead_since IS NOT NULL;

-- name: renew_leases
-- Push out every lease a live worker holds.
UPDATE deliveries SET lease_expires_at = :lease_until
WHERE lease_owner = :owner AND state = 'sending';

-- name: hand_back_all
-- Return every delivery a worker holds, unattempted (graceful shutdown).
UPDATE deliveries
SET state = CASE WHEN hold_after THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = FALSE, updated_at = :now
WHERE lease_owner = :owner AND state = 'sending';

-- name: hand_back_some
-- Return some deliveries a worker holds, unattempted.
UPDATE deliveries
SET state = CASE WHEN hold_after THEN 'held'
                 WHEN attempts > 0 OR deferrals > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, hold_after = FALSE, updated_at = :now
WHERE @any(id, ids, bigint) AND lease_owner = :owner AND state = 'sending';

-- name: expire_owner_leases
-- End the leases of dead owners now, so the next reap returns their deliveries.
UPDATE deliveries SET lease_expires_at = :now
WHERE @any(lease_owner, owners, text) AND state = 'sending';

-- name: messages
-- Some messages' stored fields (not their content).
SELECT id, lane, sender, subject, message_id, idempotency_key, size, metadata, created_at,
       submitter, send_at, expires_at
FROM messages WHERE @any(id, ids, text);

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
FROM deliveries WHERE @any(queue_id, ids, text) ORDER BY queue_id, id;

-- name: histories_of
-- Every attempt of some deliveries, oldest first.
SELECT delivery_id, at, class, code, enhanced, text, duration_ms, relay, destination, counted
FROM attempts WHERE @any(delivery_id, ids, bigint) ORDER BY delivery_id, id;

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

-- name: listed_before
-- Which of some messages have a selected delivery at or before the cursor :after: a page
-- after it leaves them out, for they belong to an earlier page (a message's recipients are not
-- always consecutive rows: concurrent PostgreSQL enqueues, recipients added by an import).
SELECT DISTINCT d.queue_id FROM deliveries d
WHERE @any(d.queue_id, candidates, text) AND d.id <= :after AND {selection};

-- name: suppression_count
-- How many entries the suppression list holds (an address may have several: a scope and a
-- reason each).
SELECT count(*) AS n FROM suppressions;

-- name: dead_letters
-- Dead recipients with their message's sender and subject and their last relay, newest first
-- ({selection} as above), after the keyset (:dead_at, :after_id) of a page before (NULL: from
-- the first).
SELECT d.id, d.queue_id, d.address, d.domain, d.destination, d.lane, d.attempts,
       d.last_class, d.updated_at, d.last_code, d.last_enhanced, d.last_text, d.reason,
       m.sender, m.subject,
       (SELECT relay FROM attempts a WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1)
           AS relay
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE {selection}
  AND coalesce(d.updated_at < :dead_at OR (d.updated_at = :dead_at AND d.id > :after_id), TRUE)
ORDER BY d.updated_at DESC, d.id LIMIT :limit;

-- name: select_delivery_ids
-- A slice of the selected deliveries, in id order from just above :after ({selection} as
-- above): bulk actions walk a selection in such slices.
SELECT d.id FROM deliveries d
WHERE {selection} AND d.id > :after
ORDER BY d.id LIMIT :limit;

-- name: summarize
-- What an action would touch: counts by lane, domain, state and last reply class.
SELECT lane, domain, {state} AS state, last_class, count(*) AS n FROM deliveries d
WHERE {selection}
GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2;

-- name: selected_destinations
-- The destinations of the selected deliveries, as stored at enqueue ({selection} as above).
SELECT DISTINCT destination FROM deliveries d
WHERE {selection}
ORDER BY 1;

-- name: dead_groups
-- Dead letters that failed alike (before masking the replies' details in Python); one never
-- tried (past its limits before a try) is told by its reason, and an expired one is grouped as
-- "expired" whatever its last reply was (it did not fail: its time ran out; dlq show has the
-- reply).
SELECT last_class, domain,
       CASE WHEN reason = 'expired' THEN NULL ELSE last_code END AS last_code,
       CASE WHEN reason = 'expired' THEN NULL ELSE last_enhanced END AS last_enhanced,
       CASE WHEN reason = 'expired' THEN reason ELSE coalesce(last_text, reason) END AS last_text,
       count(*) AS n,
       min(updated_at) AS first_dead_at, max(updated_at) AS last_dead_at,
       min(queue_id) AS sample_id
FROM deliveries d
WHERE {selection}
GROUP BY 1, 2, 3, 4, 5;

-- name: flush
-- Make queued or deferred deliveries due now (postqueue -f).
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, updated_at = :now, reason = 'flushed'
WHERE @any(id, ids, bigint) AND state IN ('queued', 'deferred');

-- name: hold
-- Hold queued or deferred deliveries (postsuper -h).
UPDATE deliveries SET state = 'held', updated_at = :now, reason = 'held by an operator'
WHERE @any(id, ids, bigint) AND state IN ('queued', 'deferred');

-- name: hold_after_send
-- A delivery being sent is held once its try is recorded (unless it was delivered).
UPDATE deliveries SET hold_after = TRUE
WHERE @any(id, ids, bigint) AND state = 'sending' AND NOT hold_after;

-- name: release
-- Release held deliveries, due now (postsuper -H), but mail scheduled for later: at its send_at.
UPDATE deliveries
SET state = 'queued', updated_at = :now, reason = 'released',
    next_attempt_at = coalesce((SELECT m.send_at FROM messages m
                                WHERE m.id = deliveries.queue_id AND m.send_at > :now), :now)
WHERE @any(id, ids, bigint) AND state = 'held';

-- name: release_after_send
-- Cancel a pending hold of a delivery being sent.
UPDATE deliveries SET hold_after = FALSE
WHERE @any(id, ids, bigint) AND state = 'sending' AND hold_after;

-- name: insert_deleted_events
-- The event of each recipient deleted before it was sent (by an operator, or cancelled by the
-- application: :why): the application hears the end of every recipient it heard queued (not
-- of one already final: it heard that).
INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane, text, metadata)
SELECT 'deleted', :now, d.queue_id, d.id, d.address, d.lane, :why, m.metadata
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE @any(d.id, ids, bigint) AND @any(d.state, states, text)
  AND d.state IN ('queued', 'deferred', 'held')
ORDER BY d.id;

-- name: delete_deliveries
-- Remove deliveries still in the given states (one a worker claimed meanwhile is left alone);
-- their attempts go with them (ON DELETE CASCADE).
DELETE FROM deliveries
WHERE @any(id, ids, bigint) AND @any(state, states, text)
RETURNING queue_id;

-- name: delete_empty_messages
-- Remove messages none of whose recipients is left.
DELETE FROM messages
WHERE @any(id, ids, text)
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.id);

-- name: requeue_dead
-- Dead deliveries start afresh: no attempts used, due now, max_age counted from now, no
-- expiry (an operator's requeue overrides expires_at). Each remembers when it died
-- (dead_since: updated_at before this update), for the recovery time.
UPDATE deliveries
SET state = 'queued', attempts = 0, deferrals = 0, next_attempt_at = :now, created_at = :now,
    expires_at = NULL, dead_since = updated_at, updated_at = :now,
    reason = 'requeued from the dead-letter queue'
WHERE @any(id, ids, bigint) AND state = 'dead'
RETURNING id, queue_id, dead_since AS dead_at;

-- name: reopen_messages
-- Messages with a recipient waiting again are not finished.
UPDATE messages SET done_at = NULL
WHERE @any(id, ids, text) AND done_at IS NOT NULL;

-- name: export_recipients
-- Some deliveries, everything about them, in id order.
SELECT queue_id, id, address, domain, destination, state, attempts, deferrals,
       next_attempt_at, created_at, last_code, last_enhanced, last_text, last_class, reason,
       updated_at, expires_at
FROM deliveries WHERE @any(id, ids, bigint) ORDER BY id;

-- name: messages_with_content
-- Some messages' stored fields and bytes.
SELECT id, lane, sender, subject, message_id, idempotency_key, metadata, created_at, content,
       send_at, expires_at
FROM messages WHERE @any(id, ids, text);

-- name: message_or_key
-- Whether a message id is stored, and whether its submitter's idempotency key is held.
SELECT EXISTS (SELECT 1 FROM messages WHERE id = :id) AS message_exists,
       EXISTS (SELECT 1 FROM messages
               WHERE idempotency_scope = :scope AND idempotency_key = :key) AS key_held;

-- name: delivery_exists
-- Whether a message already has a recipient (import skips it).
SELECT 1 AS found FROM deliveries WHERE queue_id = :queue_id AND lower(address) = lower(:address);

-- name: import_delivery
-- An exported recipient, back with its state and history.
INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state,
                        attempts, deferrals, next_attempt_at, last_code, last_enhanced,
                        last_text, last_class, reason, updated_at, expires_at)
VALUES (:queue_id, :address, :domain, :destination, :lane, :created_at, :state, :attempts,
        :deferrals, :next_attempt_at, :code, :enhanced, :text, :class, :reason, :updated_at,
        :expires_at)
RETURNING id;

-- name: defer_destination
-- Push every waiting delivery of a paused destination to the end of its pause, so claims do
-- not walk over them meanwhile (uses deliveries_destination). They wait: deferred, not ready
-- (mail scheduled for later stays queued: it was not ready yet either).
UPDATE deliveries
SET next_attempt_at = :until, reason = :reason, updated_at = :now,
    state = CASE WHEN created_at > :now THEN state ELSE 'deferred' END
WHERE destination = :destination AND state IN ('queued', 'deferred')
  AND next_attempt_at < :until;

-- name: hasten_destination
-- Call back a destination's deliveries that wait for a slot, to be spaced at its new rate.
UPDATE deliveries SET state = 'queued', next_attempt_at = :now, updated_at = :now
WHERE destination = :destination AND state IN ('queued', 'deferred')
  AND next_attempt_at > :now AND reason = :reason;

-- name: hasten_all
-- Call back every delivery that waits for a slot (the relay's rate grew).
UPDATE deliveries SET state = 'queued', next_attempt_at = :now, updated_at = :now
WHERE state IN ('queued', 'deferred') AND next_attempt_at > :now AND reason = :reason;

-- name: destination_states
-- Every destination's recorded pause and rate, and how many times an operator lifted them.
SELECT destination, rate, paused_until, reason, updated_at, lifts FROM destination_state
ORDER BY destination;

-- name: destination_lifts
-- How many times an operator lifted these destinations' pauses and slow-downs (those with a
-- recorded state).
SELECT destination, lifts FROM destination_state WHERE @any(destination, destinations, text);

-- name: insert_reports
-- Reports heard after the first hop in deliveries' histories, each with its own id when it has
-- one (a provider event's).
INSERT INTO attempts (delivery_id, at, class, code, enhanced, text, relay, destination,
                      duration_ms, counted, report_key)
@rows(delivery_id bigint, at float8, class text, code integer, enhanced text, text text,
      relay text, destination text, duration_ms integer, counted boolean, report_key text);

-- name: report_keys
-- The ids of the reports some deliveries' histories hold (a repeat of one changes nothing).
SELECT delivery_id, report_key FROM attempts
WHERE @any(delivery_id, ids, bigint) AND report_key IS NOT NULL;

-- name: insert_attempts
-- Tries in deliveries' histories.
INSERT INTO attempts (delivery_id, at, class, code, enhanced, text, relay, destination,
                      duration_ms, counted)
@rows(delivery_id bigint, at float8, class text, code integer, enhanced text, text text,
      relay text, destination text, duration_ms integer, counted boolean);

-- name: save_destination_states
-- Record destinations' pauses and rates (upsert; one row per destination in a batch). A pause
-- in force outlives a record that does not mention it or mentions a shorter one: a process
-- records only the pauses it began, and another's rate must not end them (an operator's lift
-- does). A record made before its process heard of the last lift (fewer lifts) is dropped: it
-- would undo the lift.
INSERT INTO destination_state (destination, rate, paused_until, reason, updated_at, lifts)
@rows(destination text, rate float8, paused_until float8, reason text, updated_at float8,
      lifts bigint)
ON CONFLICT (destination) DO UPDATE
SET rate = excluded.rate,
    paused_until = CASE
        WHEN destination_state.paused_until > excluded.updated_at
         AND (excluded.paused_until IS NULL
              OR excluded.paused_until < destination_state.paused_until)
        THEN destination_state.paused_until ELSE excluded.paused_until END,
    reason = CASE
        WHEN destination_state.paused_until > excluded.updated_at
         AND (excluded.paused_until IS NULL
              OR excluded.paused_until < destination_state.paused_until)
        THEN destination_state.reason ELSE excluded.reason END,
    updated_at = excluded.updated_at
WHERE destination_state.lifts <= excluded.lifts;

-- name: lift_destinations
-- An operator's flush ends some destinations' pauses and slow-downs (one more lift of each).
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now,
    lifts = lifts + 1
WHERE @any(destination, destinations, text);

-- name: lift_all_destinations
-- An operator's flush of everything ends every pause and slow-down; returns the destinations.
UPDATE destination_state
SET rate = NULL, paused_until = NULL, reason = 'lifted by an operator', updated_at = :now,
    lifts = lifts + 1
RETURNING destination;

-- name: flush_destinations
-- A lifted pause or slow-down makes due what it held back of these destinations (the backlog
-- the pause pushed to its end, what waits for their rate or cap), not what waits for a retry
-- of its own, nor mail scheduled for later (a pause pushed it back too: it goes back to its
-- send_at).
UPDATE deliveries
SET state = 'queued', next_attempt_at = :now, reason = 'flushed', updated_at = :now
WHERE @any(destination, destinations, text)
  AND state IN ('queued', 'deferred') AND next_attempt_at > :now
  AND (reason = 'destination ' || destination || ' is paused' OR reason = :waiting)
  AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = deliveries.queue_id
                  AND m.send_at > :now);

-- name: reschedule_destinations
-- Mail scheduled for later that a pause of these destinations pushed past its send_at.
UPDATE deliveries
SET next_attempt_at = (SELECT m.send_at FROM messages m WHERE m.id = deliveries.queue_id),
    updated_at = :now
WHERE @any(destination, destinations, text) AND state IN ('queued', 'deferred')
  AND EXISTS (SELECT 1 FROM messages m WHERE m.id = deliveries.queue_id
              AND m.send_at > :now AND m.send_at < deliveries.next_attempt_at);

-- name: purge_samples
-- Forget history older than the retention.
DELETE FROM metric_samples WHERE at < :before;

-- name: recoveries_after
-- Dead letters requeued since a row id (for the recovery-time histogram).
SELECT id, recovered_at - dead_at AS seconds FROM dead_letter_recoveries
WHERE id > :after ORDER BY id;

-- name: claim_recoveries
-- Take recorded recoveries for one process's histogram: a row taken is gone, so each is
-- counted once in a fleet, by whichever process's scrape takes it first.
DELETE FROM dead_letter_recoveries
WHERE id IN (SELECT id FROM dead_letter_recoveries ORDER BY id LIMIT :limit)
RETURNING recovered_at - dead_at AS seconds, recovered_at;

-- name: alert_fire
-- An alert starts firing: a change only for the process that made it.
INSERT INTO alert_state (name, firing, since, updated_at) VALUES (:name, TRUE, :now, :now)
ON CONFLICT (name) DO UPDATE SET firing = TRUE, since = :now, updated_at = :now
WHERE NOT alert_state.firing;

-- name: alert_resolve
-- A firing alert resolves: a change only for the process that made it.
UPDATE alert_state SET firing = FALSE, since = :now, updated_at = :now
WHERE name = :name AND firing;

-- name: alerts_firing
-- Alerts recorded as firing, with since when.
SELECT name, since FROM alert_state WHERE firing ORDER BY name;

-- name: attempt_classes_between
-- Attempts in a time range, by class (a minute's deferrals and soft bounces).
SELECT class, count(*) AS n FROM attempts WHERE at >= :start AND at < :end GROUP BY class;

-- name: destination_replies_since
-- Recent attempts by destination and class (the dashboard's destinations page).
SELECT destination, class, count(*) AS n FROM attempts WHERE at >= :since
GROUP BY destination, class;

-- name: suppressions_of
-- The entries of some lower-cased addresses, newest first (expired ones too, as the list).
SELECT address, scope, reason, created_at, expires_at, detail, source, code, enhanced, text,
       queue_id, lanes
FROM suppressions WHERE @any(address, addresses, text)
ORDER BY created_at DESC, address, scope, reason;

-- name: suppressions
-- The suppression list, newest first, after the keyset (:created_at, :address, :scope,
-- :reason) of a page before (NULL: from the first).
SELECT address, scope, reason, created_at, expires_at, detail, source, code, enhanced, text,
       queue_id, lanes
FROM suppressions
WHERE coalesce(created_at < :created_at
               OR (created_at = :created_at
                   AND (address, scope, reason) > (:address, :scope, :reason)), TRUE)
ORDER BY created_at DESC, address, scope, reason LIMIT :limit;

-- name: delete_suppression
-- Take an address off the suppression list: in one scope or (NULL) every scope, for one reason
-- or (NULL) every reason.
DELETE FROM suppressions
WHERE address = :address AND coalesce(scope = :scope, TRUE) AND coalesce(reason = :reason, TRUE);

-- name: purge_events
-- Forget events older than their retention, but the newest: a reader caught up on a quiet
-- system keeps a cursor it can read on from.
DELETE FROM events WHERE at < :before AND id < (SELECT max(id) FROM events);

-- name: record_check
-- The readiness probe's write.
INSERT INTO store_checks (id, checked_at) VALUES (1, :now)
ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at;

-- name: deliveries_by_id
-- Some deliveries, with their message's sender (a token names a delivery by id).
SELECT d.id, d.queue_id, d.address, d.state, d.lane, m.sender
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE @any(d.id, ids, bigint)
ORDER BY d.id;

-- name: deliveries_of_message_to
-- The deliveries to an address (lower-cased) of one message.
SELECT d.id, d.queue_id, d.address, d.state, d.lane, m.sender
FROM deliveries d JOIN messages m ON m.id = d.queue_id
WHERE d.queue_id = :queue_id AND lower(d.address) = :address
ORDER BY d.id;

-- name: deliveries_of_message_id_to
-- The deliveries to an address (lower-cased) of the messages with a Message-ID header.
SELECT d.id, d.queue_id, d.address, d.state, d.lane, m.sender
FROM messages m JOIN deliveries d ON d.queue_id = m.id
WHERE m.message_id = :message_id AND lower(d.address) = :address
ORDER BY d.id;

-- name: sole_deliveries_of_message_id_to
-- The same, of messages sent to that address alone (whose Message-ID no other recipient saw).
SELECT d.id, d.queue_id, d.address, d.state, d.lane, m.sender
FROM messages m JOIN deliveries d ON d.queue_id = m.id
WHERE m.message_id = :message_id AND lower(d.address) = :address
  AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.queue_id = m.id AND o.id <> d.id)
ORDER BY d.id;

-- name: insert_unmatched
-- Keep a report nothing matched, for the operator.
INSERT INTO feedback_unmatched (received_at, source, kind, reason, mail_from, rcpt_to, content)
VALUES (:received_at, :source, :kind, :reason, :mail_from, :rcpt_to, :content)
RETURNING id;

-- name: unmatched
-- Reports nothing matched, newest first (their sizes, not their contents).
SELECT id, received_at, source, kind, reason, mail_from, rcpt_to, length(content) AS size
FROM feedback_unmatched ORDER BY id DESC LIMIT :limit;

-- name: unmatched_report
-- One report nothing matched, with what was received.
SELECT id, received_at, source, kind, reason, mail_from, rcpt_to, length(content) AS size,
       content
FROM feedback_unmatched WHERE id = :id;

-- name: trim_unmatched
-- Forget the oldest unmatched reports beyond a total size (each row counted 512 bytes more).
DELETE FROM feedback_unmatched WHERE id IN (
    SELECT id FROM (
        SELECT id, sum(length(content) + 512) OVER (ORDER BY id DESC) AS kept
        FROM feedback_unmatched
    ) AS newest WHERE kept > :max_bytes
);

-- name: purge_unmatched
-- Forget unmatched reports older than their retention.
DELETE FROM feedback_unmatched WHERE received_at < :before;

-- name: delete_unmatched
-- Forget one unmatched report (an operator applied it).
DELETE FROM feedback_unmatched WHERE id = :id;

-- name: insert_secret
-- Make a shared key once (the first process to ask makes it).
INSERT INTO secrets (name, value, created_at) VALUES (:name, :value, :now)
ON CONFLICT (name) DO NOTHING;

-- name: secret
-- A shared key.
SELECT value FROM secrets WHERE name = :name;

-- name: create_webhook_endpoint
-- An endpoint's state, the first time it is claimed.
INSERT INTO webhook_endpoints (name, cursor, updated_at) VALUES (:name, :cursor, :now)
ON CONFLICT (name) DO NOTHING;

-- name: lease_webhook_endpoint
-- Lease an endpoint: free, already ours, or its holder's lease ran out.
UPDATE webhook_endpoints
SET lease_owner = :owner, lease_expires_at = :lease_until, updated_at = :now
WHERE name = :name
  AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at <= :now)
RETURNING name, cursor, failures, paused_until, last_error, last_error_at, last_success_at,
          delivered, lease_owner, lease_expires_at;

-- name: release_webhook_endpoint
-- Hand an endpoint back (a graceful stop).
UPDATE webhook_endpoints SET lease_owner = NULL, lease_expires_at = NULL
WHERE name = :name AND lease_owner = :owner;

-- name: webhook_delivered
-- Events up to a cursor were acknowledged: move on, and the endpoint is healthy. Only from the
-- cursor the holder last saw (a compare-and-set: an operator's replay meanwhile wins; event ids
-- are not in log order on PostgreSQL, so "not backwards" cannot be said by comparing ids).
UPDATE webhook_endpoints
SET cursor = :cursor, delivered = delivered + :count, failures = 0, paused_until = NULL,
    last_success_at = :now, updated_at = :now
WHERE name = :name AND lease_owner = :owner AND cursor = :previous;

-- name: webhook_failed
-- One more failure in a row; the endpoint waits until a time.
UPDATE webhook_endpoints
SET failures = failures + 1, paused_until = :paused_until, last_error = :error,
    last_error_at = :now, updated_at = :now
WHERE name = :name AND lease_owner = :owner;

-- name: webhook_endpoints
-- Every endpoint's state.
SELECT name, cursor, failures, paused_until, last_error, last_error_at, last_success_at,
       delivered, lease_owner, lease_expires_at
FROM webhook_endpoints ORDER BY name;

-- name: replay_webhook
-- An operator sends an endpoint's events again from a cursor, at once.
UPDATE webhook_endpoints
SET cursor = :cursor, failures = 0, paused_until = NULL, updated_at = :now
WHERE name = :name;

-- name: forget_webhook_endpoints
-- Remove the state of endpoints no longer configured.
DELETE FROM webhook_endpoints WHERE NOT @any(name, names, text);

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

-- name: take_fleet_slot
-- One more send in flight to a destination for a process, if the live sends in flight of all
-- processes stay within the cap (answers a row when granted). A row of its own that expired
-- counts from none.
INSERT INTO destination_shares (destination, owner, demand, since, expires_at, in_flight)
SELECT :destination, :owner, 0, :now, :expires_at, 1
WHERE (SELECT coalesce(sum(in_flight), 0) FROM destination_shares
       WHERE destination = :destination AND expires_at > :now) < :cap
ON CONFLICT (destination, owner) DO UPDATE
SET in_flight = CASE WHEN destination_shares.expires_at > :now
                     THEN destination_shares.in_flight ELSE 0 END + 1,
    expires_at = excluded.expires_at
RETURNING in_flight;

-- name: take_destination_slots
-- :count successive slots of a destination's rate, :interval apart, for deliveries sent back to
-- wait by any process: from the fleet's next free slot (or :earliest, if later), never past
-- :latest (a backlog beyond the horizon waits there). Answers the next free slot after them.
INSERT INTO destination_slots (destination, next_slot)
VALUES (:destination, :earliest + :count * :interval)
ON CONFLICT (destination) DO UPDATE
SET next_slot = CASE WHEN destination_slots.next_slot >= :latest THEN :latest
                     WHEN destination_slots.next_slot > :earliest THEN destination_slots.next_slot
                     ELSE :earliest END + :count * :interval
RETURNING next_slot;

-- name: forget_destination_slots
-- Some destinations' schedules start again from the next slot asked for (their rate grew, or
-- an operator lifted their limits: what waited was called back).
DELETE FROM destination_slots WHERE @any(destination, destinations, text);

-- name: forget_all_destination_slots
-- Every destination's schedule starts again (everything waiting was called back).
DELETE FROM destination_slots;

-- name: destination_probe
-- The probe that followed a destination's last pause: after which pause, whose, since when,
-- its outcome, and whether its process is alive (it renews its presence in the fleet's shares,
-- under the name '*').
SELECT pause_end, owner, started_at, outcome,
       EXISTS (SELECT 1 FROM destination_shares s
               WHERE s.owner = p.owner AND s.destination = '*' AND s.expires_at > :now) AS alive
FROM destination_probes p
WHERE destination = :destination;

-- name: take_destination_probe
-- A process probes a destination after its pause.
INSERT INTO destination_probes (destination, pause_end, owner, started_at, outcome)
VALUES (:destination, :pause_end, :owner, :now, NULL)
ON CONFLICT (destination) DO UPDATE
SET pause_end = excluded.pause_end, owner = excluded.owner, started_at = excluded.started_at,
    outcome = NULL;

-- name: renew_presence
-- A process shows it lives (its presence in the fleet's shares, under the name '*') until
-- :expires_at, or longer if renewed so already.
INSERT INTO destination_shares (destination, owner, demand, since, expires_at)
VALUES ('*', :owner, 1.0, :now, :expires_at)
ON CONFLICT (destination, owner) DO UPDATE
SET expires_at = CASE WHEN excluded.expires_at > destination_shares.expires_at
                      THEN excluded.expires_at ELSE destination_shares.expires_at END;

-- name: end_destination_probe
-- What a process's probe after a pause found ('open' or 'failed').
UPDATE destination_probes SET outcome = :outcome
WHERE destination = :destination AND owner = :owner AND pause_end = :pause_end;

-- name: give_fleet_slots
-- :n sends of a process to a destination are over.
UPDATE destination_shares
SET in_flight = CASE WHEN in_flight > :n THEN in_flight - :n ELSE 0 END
WHERE owner = :owner AND destination = :destination;

-- name: forget_expired_shares
-- Shares whose process stopped renewing them.
DELETE FROM destination_shares WHERE expires_at <= :now;

-- name: forget_shares
-- A process stops: its shares go back to the others at once.
DELETE FROM destination_shares WHERE owner = :owner;

-- name: live_shares
-- The live demands on some destinations, and every live process (for a destination not yet
-- shared: a fair guess of its share).
SELECT destination, owner, demand, since FROM destination_shares
WHERE @any(destination, destinations, text) AND expires_at > :now
ORDER BY destination, owner;

-- name: live_share_owners
-- How many processes hold live shares.
SELECT count(DISTINCT owner) AS n FROM destination_shares WHERE expires_at > :now;

-- name: event_types_between
-- Events of some types in a time range, counted by type (a minute's bounces heard later and
-- complaints, for the recorded history).
SELECT type, count(*) AS n FROM events
WHERE at >= :start AND at < :end AND @any(type, types, text)
GROUP BY type;

-- name: end_session
-- A dashboard session logged out, refused by every process until it would have expired.
INSERT INTO dashboard_logouts (session_id, until) VALUES (:session_id, :until)
ON CONFLICT (session_id) DO NOTHING;

-- name: forget_logouts
-- Logouts of sessions that have expired by now (their cookies are refused anyway).
DELETE FROM dashboard_logouts WHERE until <= :now;

-- name: session_ended
-- Whether a session was logged out.
SELECT 1 AS ended FROM dashboard_logouts WHERE session_id = :session_id AND until > :now;
