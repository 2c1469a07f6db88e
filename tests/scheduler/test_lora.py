"""LoRA in the scheduler: adapters in the running batch capped at --max-loras (base-model requests
unaffected), the adapter passed to the worker with each new sequence, and prefix-cache blocks keyed
by the adapter's content hash."""
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.request import SamplingLimits
from tests.helpers.scheduler_driver import EOS, drain, make, step

PROMPT = list(range(1, 14))  # three full blocks of 4, and one token more


def lora(name, content_hash="h"):
    return pb.LoRARequest(lora_name=name, lora_path=f"/adapters/{name}", content_hash=content_hash)


def add(s, rid, adapter, prompt=PROMPT, max_tokens=3):
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    limits = SamplingLimits(max_tokens, 0, frozenset(), frozenset({EOS}), True)
    return s.add_request(rid, prompt, params, limits, lora=adapter)


def test_running_adapters_are_capped_at_max_loras():
    s, w = make(num_blocks=256, enable_lora=True, max_loras=2)
    for rid, adapter in [("a", lora("a")), ("b", lora("b")), ("c", lora("c")), ("base", None), ("a2", lora("a"))]:
        add(s, rid, adapter, [ord(rid[0]), 2, 3])
    plan, _ = step(s, w)
    admitted = {new.seq_id: new.lora_request.lora_name for new in plan.new_sequences}
    assert sorted(admitted.values()) == ["", "a", "a", "b"]  # c waits for a slot; base and a2 do not
    assert [seq.request.request_id for seq in s.waiting] == ["c"]
    drain(s, w)
    assert not s.requests and s.kv.num_used_blocks == 0


def test_prefix_cache_never_crosses_adapters_or_content():
    s, w = make(num_blocks=256, enable_lora=True, max_loras=4)
    cached = {}
    for rid, adapter in [("first", lora("a", "h1")), ("same", lora("a", "h1")), ("reloaded", lora("a", "h2")),
                         ("other", lora("b", "h1")), ("base", None), ("base2", None)]:
        request = add(s, rid, adapter)
        drain(s, w)
        cached[rid] = request.sequences[0].num_cached_tokens
    assert cached == {"first": 0, "same": 12, "reloaded": 0, "other": 0, "base": 0, "base2": 12}


def test_adapter_requests_are_refused_unless_lora_is_enabled():
    import pytest

    from pagedserve.scheduler.lora import lora_of
    from pagedserve.scheduler.validation import InvalidRequest

    off, _ = make()
    request = pb.GenerateRequest(prompt_token_ids=[1], lora_request=lora("a"))
    with pytest.raises(InvalidRequest, match="--enable-lora"):
        lora_of(request, off.config)
    on, _ = make(enable_lora=True)
    assert lora_of(request, on.config).lora_name == "a" and lora_of(pb.GenerateRequest(), on.config) is None


def test_lora_requests_counts_running_and_waiting_per_adapter():
    from pagedserve.scheduler.lora import lora_requests

    s, w = make(num_blocks=256, enable_lora=True, max_loras=1)
    for rid, adapter in [("a", lora("a")), ("a2", lora("a")), ("b", lora("b")), ("base", None)]:
        add(s, rid, adapter, [ord(rid[0]), 2, 3])
    step(s, w)
    counts = {c.lora_name: (c.running, c.waiting) for c in lora_requests(s.running, s.waiting)}
    assert counts == {"a": (2, 0), "b": (0, 1)}
