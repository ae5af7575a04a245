"""The provider simulator: an SMTP server that answers the way real providers do.

``postlane simulate`` listens for SMTP and plays a *scenario*, a TOML file (or one of the built-in
ones in ``postlane/data/scenarios/``) saying what a provider answers, recipient by recipient:
accept; defer with 451; throttle a client above a rate with Gmail's ``421-4.7.28``; hard-bounce
with ``550-5.1.1``; block for spam, reputation or DMARC; report a full mailbox; refuse a message
that is too large; answer slowly; drop the connection after DATA without a reply; require
STARTTLS; or turn every connection away. Or accept, and a second or two later send a bounce (a
DSN) or a spam complaint (an ARF report) to the message's return path, at postlane's bounce
listener, as relays and feedback loops do. When it stops it reports, as JSON, what it accepted,
how it answered and what it reported afterwards, so a benchmark or a test can check a queue
against it: nothing lost, nothing delivered twice (duplicates by Message-ID), throttling obeyed
(accepted messages per second).

Modules::

    scenario   Scenario, a parsed scenario file: Scenario.load("flaky") or Scenario.load("my.toml").
               Strict: an unknown key or a bad value is a ConfigError naming the key.
    replies    Reply, a reply template with placeholders ({address}, {ip}...)
    simulator  Simulator, the server on the running event loop: await start() -> (host, port),
               await wait() (until max_messages), await wait_for_reports(), await stop(),
               report() -> dict; run_until_stopped(), what ``postlane simulate`` runs
               (postlane.cli.simulate)
    provider   the aiosmtpd server and handler that play the scenario
    feedback   the DSNs and complaints of stage "later" rules: composed, delivered to
               reports_to with retries, counted (LateReports)
    report     the counts behind the report; find_message_id
    tls        the STARTTLS certificate: the scenario's, or a self-signed one

The server is aiosmtpd, created per connection by ``loop.create_server``, with hooks that play the
scenario. Random decisions (probabilities, delay ranges, which of several replies) come from one
``random.Random(seed)``: the same seed and the same client traffic give the same answers. It is
built not to be the bottleneck of a benchmark: each reply template is classified once, messages
are not parsed (the Message-ID is found by a bytes search of the header block), duplicates are
remembered as hashes, and nothing is written to disk unless ``store_dir`` is given.

The scenario format is described in ``docs/simulator.md``.
"""

from postlane.simulate.replies import Reply
from postlane.simulate.report import find_message_id
from postlane.simulate.scenario import (
    Connect,
    Delays,
    Rule,
    Scenario,
    ServerReplies,
    Stage,
    Throttle,
    TLSMode,
    builtin_scenarios,
)
from postlane.simulate.simulator import Simulator, run_until_stopped

__all__ = [
    "Connect",
    "Delays",
    "Reply",
    "Rule",
    "Scenario",
    "ServerReplies",
    "Simulator",
    "Stage",
    "TLSMode",
    "Throttle",
    "builtin_scenarios",
    "find_message_id",
    "run_until_stopped",
]
