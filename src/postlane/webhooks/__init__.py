"""Outbound webhooks: the event log, POSTed to the application's endpoints, signed as the
Standard Webhooks specification says, at least once, in order per message, durably.

- :mod:`~postlane.webhooks.endpoints`: ``[[webhooks.out]]`` tables, checked
  (:class:`WebhookEndpoint`, :func:`endpoints_from_config`);
- :mod:`~postlane.webhooks.addresses`: where a webhook may go (no private addresses unless
  allowed; checked again after each DNS lookup);
- :mod:`~postlane.webhooks.signing`: the payload and the ``webhook-*`` headers;
- :mod:`~postlane.webhooks.retry`: the backoff schedule of a failing endpoint;
- :mod:`~postlane.webhooks.http`: the small HTTP/1.1 client that posts them;
- :mod:`~postlane.webhooks.sender`: :class:`WebhookSender`, which follows the event log;
- :mod:`~postlane.webhooks.subscribers`: in-process subscribers (:func:`follow_events`,
  :class:`EventSubscribers`);
- :mod:`~postlane.webhooks.operations`: what operators do (list, failures, test, replay).
"""
