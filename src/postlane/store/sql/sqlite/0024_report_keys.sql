-- Version 24: a report's own id beside its entry in a recipient's history (a provider event's
-- id: SendGrid's sg_event_id, Mailgun's event id, ...). Providers deliver their events at least
-- once; a delay or a delivery sent again added a second entry and a second `deferred` event.
-- A report whose id the recipient's history already holds now changes nothing.
ALTER TABLE attempts ADD COLUMN report_key TEXT;
