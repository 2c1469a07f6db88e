"""Where the schedulers are: `--scheduler-addrs host:port,host:port` (or `--scheduler-addr`)
turned into one address per replica.

A host that is a name resolving to several addresses (a Kubernetes headless Service: one A record
per ready pod) stands for a replica at each of them; the router resolves it again every few
seconds (router/replicas.py), so replicas that come and go are found. A name that resolves to one
address stays a name (gRPC resolves it itself, and follows it when it moves). IPv4 is asked for
first, so `localhost` is one replica, not one per address family.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket


def split_targets(text: str) -> list[tuple[str, int]]:
    """"a:1,b:2" -> [("a", 1), ("b", 2)]; IPv6 hosts in brackets ("[::1]:50051").
    Raises ValueError naming an entry without a port."""
    targets = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"scheduler address {entry!r}: expected host:port")
        targets.append((host, int(port)))
    if not targets:
        raise ValueError("no scheduler address given")
    return targets


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def resolve(targets: list[tuple[str, int]]) -> list[str]:
    """One "host:port" per replica, in a stable order (the targets', then sorted addresses)."""
    found: list[str] = []
    for host, port in targets:
        for a in await expand(host, port):
            if a not in found:
                found.append(a)
    return found


async def expand(host: str, port: int) -> list[str]:
    if is_literal(host):
        return [address(host, port)]
    loop = asyncio.get_running_loop()
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        ips = sorted({info[4][0] for info in infos})
        if len(ips) > 1:
            return [address(ip, port) for ip in ips]
        if ips:
            break
    # One address, or none yet (a headless Service with no ready pod): the name itself, which
    # the health checks will find down until it answers.
    return [address(host, port)]


def has_names(targets: list[tuple[str, int]]) -> bool:
    """Whether any target must be resolved again from time to time."""
    return any(not is_literal(host) for host, _ in targets)
