"""Cluster DNS for scripts/kube-node.sh: `<service>.<namespace>.svc.<domain>` -> ClusterIP.

A real cluster runs CoreDNS as an add-on; Debian ships no CoreDNS, and nothing can be
pulled, so the node gets this instead, started by kube-node.sh beside the kubelet, whose
`clusterDNS` points at it. steer needs it for the name its Envoys dial
(steer-control.steer-system.svc, as the DaemonSet says, with dnsPolicy
ClusterFirstWithHostNet), and test pods may use Service names like on any cluster.

What it answers (UDP only: no answer here is big enough to need TCP):
  - A for a Service with a ClusterIP, TTL 5 s; the list is kept by a watch on the API;
  - no data (NOERROR, no answer) for other types of such a name, so resolvers asking
    AAAA and A at once do not wait;
  - NXDOMAIN for any other name in the cluster domain (the search path's tries);
  - REFUSED for names outside it: the node has no upstream resolver to ask.

Standard library only: it runs with the host's /usr/bin/python3, before and without steer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Any

log = logging.getLogger("kube-dns")

TYPE_A = 1
CLASS_IN = 1
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5
RCODE_FORMERR = 1
TTL = 5


class Services:
    """ClusterIPs by (namespace, name), kept current by list + watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ips: dict[tuple[str, str], str] = {}

    def get(self, namespace: str, name: str) -> str | None:
        with self._lock:
            return self._ips.get((namespace, name))

    def replace(self, items: list[dict[str, Any]]) -> None:
        ips = {}
        for item in items:
            key, ip = _entry(item)
            if ip:
                ips[key] = ip
        with self._lock:
            self._ips = ips

    def apply(self, kind: str, item: dict[str, Any]) -> None:
        key, ip = _entry(item)
        with self._lock:
            if kind == "DELETED" or not ip:
                self._ips.pop(key, None)
            else:
                self._ips[key] = ip


def _entry(item: dict[str, Any]) -> tuple[tuple[str, str], str | None]:
    meta = item.get("metadata", {})
    ip = item.get("spec", {}).get("clusterIP")
    key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
    return key, ip if ip and ip != "None" else None


class Api:
    def __init__(self, server: str, ca: str, cert: str, key: str) -> None:
        host, _, port = server.removeprefix("https://").partition(":")
        self.host, self.port = host, int(port or 443)
        self.context = ssl.create_default_context(cafile=ca)
        self.context.load_cert_chain(cert, key)

    def get(self, path: str, timeout: float) -> http.client.HTTPResponse:
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self.context, timeout=timeout
        )
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            raise OSError(f"GET {path}: {response.status} {response.read(200)!r}")
        return response


def keep_services(api: Api, services: Services) -> None:
    """List, then watch from that version; on any error, list again after a second."""
    while True:
        try:
            listed = json.load(api.get("/api/v1/services", timeout=10))
            services.replace(listed.get("items", []))
            version = listed["metadata"]["resourceVersion"]
            watch = api.get(
                f"/api/v1/services?watch=1&resourceVersion={version}&timeoutSeconds=300",
                timeout=330,
            )
            for line in watch:
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    break  # e.g. 410 Gone: the version is too old; list again
                services.apply(str(event.get("type")), event.get("object", {}))
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            log.warning("services: %s; listing again", exc)
            time.sleep(1)


def parse_question(query: bytes) -> tuple[int, int, bytes, str, int] | None:
    """(id, flags, the question's bytes, lowercased name, qtype), or None if malformed."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if qdcount != 1 or flags & 0x8000:  # one question, and a query, not a response
        return None
    labels, offset = [], 12
    while True:
        if offset >= len(query):
            return None
        length = query[offset]
        if length & 0xC0:  # no compression in a question from a sane resolver
            return None
        offset += 1
        if length == 0:
            break
        labels.append(query[offset : offset + length].decode("ascii", "replace").lower())
        offset += length
    if offset + 4 > len(query):
        return None
    qtype, _qclass = struct.unpack("!HH", query[offset : offset + 4])
    return ident, flags, query[12 : offset + 4], ".".join(labels), qtype


def answer(query: bytes, services: Services, domain: str) -> bytes | None:
    parsed = parse_question(query)
    if parsed is None:
        if len(query) < 2:
            return None
        return query[:2] + struct.pack("!HHHHH", 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
    ident, flags, question, name, qtype = parsed
    rd = flags & 0x0100
    records = b""
    suffix = f".svc.{domain}"
    if name == domain or name.endswith(f".{domain}"):
        rcode = RCODE_NXDOMAIN
        parts = name.removesuffix(suffix).split(".") if name.endswith(suffix) else []
        ip = services.get(parts[1], parts[0]) if len(parts) == 2 else None
        if ip is not None:
            rcode = 0
            if qtype == TYPE_A:
                # The name as a pointer to the question at offset 12.
                records = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4)
                records += socket.inet_aton(ip)
        aa = 0x0400
    else:
        rcode, aa = RCODE_REFUSED, 0
    header = struct.pack("!HHHHHH", ident, 0x8000 | aa | rd | rcode, 1, 1 if records else 0, 0, 0)
    return header + question + records


def serve(address: str, port: int, services: Services, domain: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    log.info("answering for *.svc.%s on %s:%d/udp", domain, address, port)
    while True:
        query, peer = sock.recvfrom(512)
        reply = answer(query, services, domain)
        if reply is not None:
            sock.sendto(reply, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="the address to answer on")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--domain", default="cluster.local")
    parser.add_argument("--server", required=True, help="https://host:port of the API server")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    services = Services()
    api = Api(args.server, args.ca, args.cert, args.key)
    threading.Thread(target=keep_services, args=(api, services), daemon=True).start()
    serve(args.listen, args.port, services, args.domain.strip(".").lower())


if __name__ == "__main__":
    main()
