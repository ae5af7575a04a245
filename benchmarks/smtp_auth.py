"""SMTP AUTH guessing against `postlane serve`: how many passwords an attacker gets checked per
second, and what it does to the event loop everyone shares (the latency of GET /healthz).

    python benchmarks/smtp_auth.py [--connections 50] [--addresses 1] [--seconds 20]
                                   [--src PATH]   # another checkout's src/, for a before/after

The attacker (tests/smtp_attack.py, in its own process) runs CONNECTIONS threads from ADDRESSES
loopback source addresses, each doing STARTTLS and AUTH PLAIN with wrong passwords as fast as the
server answers, reconnecting whenever it hangs up. Meanwhile /healthz is asked every 20 ms; its
latency is measured first without the attack (for a baseline), then under it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

import httpx
import trustme
from _common import table
from deliver import free_port

from tests.processes import start_postlane

REPOSITORY = Path(__file__).resolve().parents[1]


def healthz_latencies(port: int, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    return latencies


def describe(latencies: list[float]) -> list[str]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return [
        f"{statistics.median(ordered) * 1000:.1f} ms",
        f"{p99 * 1000:.1f} ms",
        f"{ordered[-1] * 1000:.1f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--addresses", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--src", help="run postlane from this src/ folder (a before/after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(folder / "server.pem")
        )
        http_port, smtp_port = free_port(), free_port()
        hashed = (
            subprocess.run(
                [sys.executable, "-m", "postlane.cli", "hash-password", "--stdin"],
                input=b"the-real-password\n",
                capture_output=True,
                check=True,
                env={**os.environ, **({"PYTHONPATH": args.src} if args.src else {})},
            )
            .stdout.decode()
            .strip()
        )
        config = folder / "postlane.toml"
        config.write_text(
            f"""
[store]
url = "sqlite:///{folder / "auth.db"}"
[delivery]
relay = "capture://{folder / "captured"}"
[http]
listen = "127.0.0.1:{http_port}"
[smtp]
listen = "127.0.0.1:{smtp_port}"
trusted_networks = []
users = {{ app = "{hashed}" }}
tls_cert = "{folder / "server.pem"}"
tls_key = "{folder / "server.pem"}"
"""
        )
        env = {"PYTHONPATH": args.src} if args.src else None
        serve = start_postlane("serve", config=config, log=folder / "serve.log", env=env)
        with serve:
            serve.wait_running_blocking()
            quiet = healthz_latencies(http_port, 5.0)
            under_attack: list[float] = []
            prober = threading.Thread(
                target=lambda: under_attack.extend(healthz_latencies(http_port, args.seconds))
            )
            attacker = subprocess.Popen(
                [
                    sys.executable,
                    str(REPOSITORY / "tests" / "smtp_attack.py"),
                    str(smtp_port),
                    str(folder / "ca.pem"),
                    f"--connections={args.connections}",
                    f"--addresses={args.addresses}",
                    f"--seconds={args.seconds}",
                ],
                stdout=subprocess.PIPE,
            )
            prober.start()
            out, _ = attacker.communicate(timeout=args.seconds + 120)
            prober.join()
            attack = json.loads(out)
    print(f"postlane from {args.src or REPOSITORY / 'src'}")
    print(
        f"{args.connections} connections from {args.addresses} address(es), "
        f"{attack['seconds']} s: {attack}"
    )
    print(
        table(
            ["", "passwords checked/s", "/healthz p50", "p99", "max"],
            [
                ["no attack", "-", *describe(quiet)],
                ["under attack", attack["checked_per_second"], *describe(under_attack)],
            ],
        )
    )


if __name__ == "__main__":
    main()
