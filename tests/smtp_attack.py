"""An SMTP AUTH guessing attack, for the tests and benchmarks/smtp_auth.py: CONNECTIONS threads,
each connecting (from one of ADDRESSES loopback source addresses, 127.0.0.2 and up), doing
STARTTLS and guessing passwords with AUTH PLAIN as fast as the server answers, reconnecting
whenever it hangs up, for SECONDS. Run it in its own process, so that its work does not count
against the server's event loop::

    python tests/smtp_attack.py PORT CA_FILE [--connections 50] [--addresses 1] [--seconds 10]

Prints one JSON object: connections made, answers by kind (``checked``: 535, the password was
checked and wrong; ``refused_total``: 454; ``refused``: 421 at connect or at AUTH;
``accepted``: 235, which a wrong guess must never get), and guesses checked per second.
"""

from __future__ import annotations

import argparse
import collections
import json
import smtplib
import ssl
import sys
import threading
import time


def attack(
    port: int, ca_file: str, *, connections: int, addresses: int, seconds: float, user: str
) -> dict[str, float]:
    context = ssl.create_default_context(cafile=ca_file)
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def count(kind: str) -> None:
        with lock:
            counts[kind] += 1

    def guess_from(source: str) -> None:
        guess = 0
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP(
                    "127.0.0.1", port, timeout=30, source_address=(source, 0)
                ) as client:
                    count("connections")
                    client.starttls(context=context)
                    client.ehlo()
                    while time.monotonic() < deadline:
                        guess += 1
                        client.user, client.password = user, f"guess-{source}-{guess}"
                        try:
                            code, _ = client.auth("PLAIN", client.auth_plain)
                        except smtplib.SMTPAuthenticationError as exc:
                            code = exc.smtp_code
                        except smtplib.SMTPResponseException as exc:
                            code = exc.smtp_code
                        if code == 535:
                            count("checked")
                        elif code == 454:
                            count("refused_total")
                        elif code == 235:
                            count("accepted")
                        else:
                            count("refused")
                            break
            except smtplib.SMTPConnectError:
                count("refused")
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                count(f"disconnected ({type(exc).__name__})")

    started = time.monotonic()
    threads = [
        threading.Thread(target=guess_from, args=(f"127.0.0.{2 + n % addresses}",), daemon=True)
        for n in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    elapsed = time.monotonic() - started
    result: dict[str, float] = dict(counts)
    result["seconds"] = round(elapsed, 2)
    result["checked_per_second"] = round(counts["checked"] / elapsed, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("ca_file")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--addresses", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--user", default="app")
    args = parser.parse_args()
    result = attack(
        args.port,
        args.ca_file,
        connections=args.connections,
        addresses=args.addresses,
        seconds=args.seconds,
        user=args.user,
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
