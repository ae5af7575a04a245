"""Half-sent HTTP requests against ``postlane serve`` at a 1,024-descriptor limit (audit finding 7).

    python benchmarks/half_open.py [--connections 3000] [--nofile 1024] [--source DIR]

Starts ``postlane serve`` under ``ulimit -n NOFILE``, opens CONNECTIONS connections that each
send half a request head and then nothing, and reports whether ``/healthz`` answers and an SMTP
submission goes through during the flood, and how many of the connections are still open once
the header timeout has passed. ``--source DIR`` runs the postlane found in DIR/src instead (an
older checkout, for a before/after comparison).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def still_open(sock: socket.socket) -> bool:
    """The server has not closed it (whatever it said before closing is read and dropped)."""
    sock.settimeout(0.01)
    try:
        while sock.recv(4096):
            pass
        return False
    except TimeoutError:
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--wait", type=float, default=12.0, help="seconds before counting")
    parser.add_argument("--source", type=Path, help="run the postlane in DIR/src")
    args = parser.parse_args()

    limit = max(args.connections + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    )
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        http_port, smtp_port = free_port(), free_port()
        (directory / "postlane.toml").write_text(
            f'[http]\nlisten = "127.0.0.1:{http_port}"\n[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
            f'[delivery]\nrelay = "capture://{directory / "captured"}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source.resolve() / "src")
        command = (
            f"ulimit -n {args.nofile}; exec {shlex.quote(sys.executable)} -m postlane.cli serve"
        )
        with (directory / "serve.log").open("w") as log:
            server = subprocess.Popen(
                ["bash", "-c", command], cwd=directory, env=env, stdout=log, stderr=log
            )
        base = f"http://127.0.0.1:{http_port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            flood = []
            for _ in range(args.connections):
                sock = socket.socket()
                try:
                    sock.connect(("127.0.0.1", http_port))
                    sock.send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                except OSError:
                    sock.close()
                    continue
                flood.append(sock)
            time.sleep(1.0)
            try:
                health = str(httpx.get(base + "/healthz", timeout=5).status_code)
            except httpx.HTTPError as exc:
                health = type(exc).__name__
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
                    smtp.sendmail("a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
                submission = "accepted"
            except (OSError, smtplib.SMTPException) as exc:
                submission = f"failed ({type(exc).__name__})"
            time.sleep(args.wait)
            left = sum(still_open(sock) for sock in flood)
            for sock in flood:
                sock.close()
        finally:
            server.terminate()
            server.wait(30)
    source = str(args.source) if args.source else "this checkout"
    print(f"postlane from {source}, ulimit -n {args.nofile}, {len(flood)} half-sent requests:")
    print(f"  /healthz during the flood: {health}")
    print(f"  SMTP submission during the flood: {submission}")
    print(f"  still open {args.wait:g} s later: {left}")


if __name__ == "__main__":
    main()
