"""A router in front of two fake schedulers (--scheduler-addrs): every request goes to a healthy
one; one that fails its health checks gets nothing until it is healthy again."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from pagedserve.router import discovery
from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer
from tests.helpers.router_fixtures import EOS, Harness, eventually


@pytest.fixture(scope="module")
def pair(model_dir, tokenizer):
    """The package's harness pattern with a second fake scheduler and a round-robin router."""
    h = Harness(str(model_dir), tokenizer.get_vocab_size(), [EOS])
    other = FakeScheduler(vocab_size=tokenizer.get_vocab_size(), eos_token_ids=[EOS],
                          model_path=str(model_dir), served_model_name="smol")
    second = FakeSchedulerServer(other)
    h.loop.run(second.start())
    addrs = f"{h.scheduler.address},{second.address}"
    router = h.router(scheduler_addrs=addrs, routing_policy="round_robin",
                      health_interval_s=0.1)
    yield h, router, (h.fake, other), second
    h.loop.run(second.stop())
    h.close()


def complete(url: str, prompt="hello", **headers) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=30, headers=headers,
                      json={"model": "smol", "prompt": prompt, "max_tokens": 2})


def counts(fakes) -> list[int]:
    return [len(f.requests) for f in fakes]


@pytest.fixture
def fakes(pair):
    for f in pair[2]:
        f.reset()
    eventually(lambda: httpx.get(pair[1].url + "/health").status_code == 200)
    return pair[2]


def test_two_replicas_share_the_requests(pair, fakes):
    for _ in range(6):
        assert complete(pair[1].url).status_code == 200
    assert counts(fakes) == [3, 3]


def test_an_unhealthy_replica_gets_nothing_until_it_is_healthy_again(pair, fakes):
    url = pair[1].url
    fakes[1].healthy = False
    metrics = lambda: httpx.get(url + "/metrics").text  # noqa: E731
    eventually(lambda: "pagedserve_router_healthy_replicas 1.0" in metrics())
    for _ in range(4):
        assert complete(url).status_code == 200
    assert counts(fakes) == [4, 0]
    assert httpx.get(url + "/health").status_code == 200  # one replica serves
    fakes[1].healthy = True
    eventually(lambda: "pagedserve_router_healthy_replicas 2.0" in metrics())
    for _ in range(4):
        assert complete(url).status_code == 200
    assert counts(fakes) == [6, 2]


def test_a_replica_that_goes_away_is_left_out_and_taken_back(pair, fakes):
    h, router, _, second = pair
    h.loop.run(second.stop())
    try:
        eventually(lambda: 'pagedserve_router_replica_healthy{replica="%s"} 0.0' % second.address
                   in httpx.get(router.url + "/metrics").text)
        for _ in range(3):
            assert complete(router.url).status_code == 200
        assert counts(fakes) == [3, 0]
    finally:
        h.loop.run(second.start())
    eventually(lambda: 'pagedserve_router_replica_healthy{replica="%s"} 1.0' % second.address
               in httpx.get(router.url + "/metrics").text)
    for _ in range(4):
        assert complete(router.url).status_code == 200
    assert counts(fakes)[1] >= 1


def test_per_replica_metrics_count_the_requests_routed(pair, fakes):
    url = pair[1].url
    before = routed(url)
    for _ in range(4):
        complete(url)
    after = routed(url)
    assert sum(after.values()) - sum(before.values()) == 4
    assert all(after[a] - before[a] == 2 for a in after)


def test_the_session_header_keeps_a_session_on_one_replica(pair, fakes):
    h = pair[0]
    addrs = f"{h.scheduler.address},{pair[3].address}"
    url = h.router(scheduler_addrs=addrs, routing_policy="session", health_interval_s=0.1).url
    eventually(lambda: "pagedserve_router_healthy_replicas 2.0" in httpx.get(url + "/metrics").text)
    places = {}
    for session in [f"user-{i}" for i in range(12)]:
        for fake in fakes:
            fake.reset()
        for _ in range(3):
            assert complete(url, **{"x-session-id": session}).status_code == 200
        places[session] = counts(fakes)
        assert sorted(places[session]) == [0, 3]  # all three on one replica
    assert len({tuple(p) for p in places.values()}) == 2  # and the sessions on both


def routed(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("pagedserve_router_replica_requests_total{"):
            address = line.split('replica="')[1].split('"')[0]
            out[address] = float(line.rsplit(" ", 1)[1])
    return out


def test_scheduler_addrs_are_split_and_checked():
    assert discovery.split_targets("a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("[::1]", 3)]
    for bad in ("a", "a:", ":5", ""):
        with pytest.raises(ValueError):
            discovery.split_targets(bad)


def test_a_name_is_one_replica_per_address_it_resolves_to():
    async def go():
        # localhost: IPv4 first, so one replica, not one per address family; literals stay.
        return await discovery.resolve([("localhost", 1), ("10.0.0.1", 2), ("::1", 3)])
    assert asyncio.run(go()) == ["localhost:1", "10.0.0.1:2", "[::1]:3"]


def test_a_name_with_several_addresses_expands(monkeypatch):
    import socket

    async def fake_getaddrinfo(self, host, port, family=0, type=0):
        if family != socket.AF_INET:
            raise socket.gaierror("no AAAA")
        return [(family, type, 6, "", (ip, port)) for ip in ("10.1.0.7", "10.1.0.5")]
    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    found = asyncio.run(discovery.resolve([("engine.pagedserve.svc", 50051)]))
    assert found == ["10.1.0.5:50051", "10.1.0.7:50051"]


def test_a_bad_scheduler_address_stops_the_router_with_a_message():
    from pagedserve.router.__main__ import main
    with pytest.raises(SystemExit, match="--scheduler-addrs: scheduler address 'b': expected host:port"):
        main(["--scheduler-addrs", "a:1,b"])
