"""A tiny authoritative DNS server for tests, answering from a dict, on 127.0.0.1 (UDP and TCP).

Direct MX delivery is only as good as its handling of what DNS answers, so its tests talk to a
real server over the wire rather than to a stubbed resolver: MX records in preference order, A
and AAAA, a null MX (RFC 7505, ``0 .``), a name that does not exist (NXDOMAIN), a server failure
(SERVFAIL), and a server that never answers (a timeout).

The zone is a plain dict that tests may change while the server runs::

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "null.test": {"MX": [(0, ".")]},
        "broken.test": SERVFAIL,
        "silent.test": NO_ANSWER_AT_ALL,
    }

A name missing from the dict is NXDOMAIN; a name present without the asked type is an empty
NOERROR answer (what a resolver reports as "no answer"). Every query is recorded in
:attr:`DNSServer.queries` as ``(name, type)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

#: a name that answers SERVFAIL to every query
SERVFAIL = "SERVFAIL"
#: a name whose queries are never answered (the resolver times out)
NO_ANSWER_AT_ALL = "NO_ANSWER_AT_ALL"

Zone = dict[str, Any]
TTL = 60


@dataclass
class DNSServer:
    """A running test DNS server: point a resolver at :attr:`port` on 127.0.0.1."""

    zone: Zone
    host: str = "127.0.0.1"
    port: int = 0
    queries: list[tuple[str, str]] = field(default_factory=list)

    def resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """An async resolver that asks this server only, with no cache (tests change the zone)."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        entry = self.zone.get(name)
        if entry == NO_ANSWER_AT_ALL:
            return None
        if entry == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        records = entry.get(rdtype, []) if isinstance(entry, Mapping) else []
        if records:
            texts = [_rdata_text(rdtype, record) for record in records]
            response.answer.append(
                dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN, rdtype, texts)
            )
        return response.to_wire()


def _rdata_text(rdtype: str, record: Any) -> str:
    if rdtype == "MX":
        preference, exchange = record
        exchange = exchange if exchange.endswith(".") else exchange + "."
        return f"{preference} {exchange}"
    if rdtype == "TXT":
        chunks = [record[i : i + 255] for i in range(0, len(record), 255)] or [""]
        return " ".join(f'"{chunk}"' for chunk in chunks)
    return str(record)


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _serve_tcp(
    server: DNSServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """DNS over TCP: each message is preceded by its length (RFC 1035 4.2.2)."""
    try:
        while True:
            try:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            reply = server.answer(wire)
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def running_dns_server(zone: Zone) -> AsyncIterator[DNSServer]:
    """Serve ``zone`` on 127.0.0.1, UDP and TCP on the same free port, until the block ends."""
    loop = asyncio.get_running_loop()
    server = DNSServer(zone)
    tcp = await asyncio.start_server(
        lambda r, w: _serve_tcp(server, r, w), server.host, 0, reuse_address=True
    )
    server.port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(
        lambda: _UDP(server), local_addr=(server.host, server.port)
    )
    try:
        yield server
    finally:
        udp.close()
        tcp.close()
        await tcp.wait_closed()
