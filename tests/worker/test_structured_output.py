"""Structured outputs in the worker: xgrammar compiled against SmolLM2's tokenizer, the bitmask
applied by the sampler to constrained rows only, matchers restored after preemption."""
import json

import jsonschema
import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.worker.sampler import Sampler
from pagedserve.worker.structured_output import Grammars, advance
from tests.helpers.batch import Batch

VOCAB = 49152  # SmolLM2's config.json
EOS = 2
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "sizes"],
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                         "sizes": {"type": "array", "maxItems": 3,
                                   "items": {"type": "integer", "minimum": 0, "maximum": 99}}}}


@pytest.fixture(scope="module")
def grammars(model_dir):
    return Grammars(model_dir, VOCAB, [EOS])


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def batch():
    return Batch(VOCAB)


def seq(batch, grammar=None, **params):
    """A live sequence of `batch` with a 3-token prompt, constrained by `grammar` (as the model
    runner sets a new sequence's matcher)."""
    s = batch.add([1, 2, 3], **params)
    s.grammar = grammar
    return s


def generate(batch, seqs, steps, seed=0):
    """Samples `steps` tokens for every sequence from random logits, as the worker does (mask in
    the sampler, append, advance); constrained sequences stop once their grammar is complete."""
    sampler = Sampler(VOCAB, [EOS], seed=seed, device="cpu")
    logits_gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        live = [s for s in seqs if not (s.grammar is not None and s.grammar.is_terminated())]
        if not live:
            return
        inputs, sampling = batch.step(live)
        logits = torch.randn(len(sampling), VOCAB, generator=logits_gen) * 4
        tokens = sampler(logits, sampling).token_ids
        batch.batch.finish_step(inputs, tokens)
        advance(sampling, tokens)


def test_constraints_that_do_not_compile_say_why(grammars):
    assert grammars.check(pb.StructuredOutputParams(json=json.dumps(SCHEMA))) == ""
    assert grammars.check(pb.StructuredOutputParams(json="{not json")).startswith("json: Failed to parse JSON")
    assert "parenthesis is not closed" in grammars.check(pb.StructuredOutputParams(regex="(ab"))
    assert 'Rule "nope" is not defined' in grammars.check(pb.StructuredOutputParams(grammar="root ::= nope"))
    assert "exactly one" in grammars.check(pb.StructuredOutputParams(regex="a", choice=["b"]))
    assert "exactly one" in grammars.check(pb.StructuredOutputParams())


def test_choice_rows_pick_a_choice_and_end_on_eos_while_free_rows_are_untouched(grammars, tokenizer, batch):
    choices = ["yes", "no", "maybe so"]
    constraint = pb.StructuredOutputParams(choice=choices)
    free = [seq(batch, temperature=0), seq(batch, temperature=0)]
    bound = [seq(batch, grammars.matcher(constraint, []), temperature=1.0, seed=7),
             seq(batch, grammars.matcher(constraint, []), temperature=1.0, seed=8)]
    mixed = [free[0], bound[0], free[1], bound[1]]
    alone = [seq(batch, temperature=0), seq(batch, temperature=0)]

    sampler = Sampler(VOCAB, [EOS], seed=0, device="cpu")
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)) * 4
    expected = Sampler(VOCAB, [EOS], seed=0, device="cpu")(logits[[0, 2]].clone(), alone).token_ids
    assert [sampler(logits.clone(), mixed).token_ids[i] for i in (0, 2)] == expected

    generate(batch, bound, steps=12)
    for s in bound:
        assert s.grammar.is_terminated() and s.token_ids[-1] == EOS
        assert tokenizer.decode(s.token_ids[3:-1]) in choices


def test_json_schema_outputs_validate(grammars, tokenizer, batch):
    constraint = pb.StructuredOutputParams(json=json.dumps(SCHEMA))
    seqs = [seq(batch, grammars.matcher(constraint, []), temperature=1.0, seed=i) for i in range(4)]
    generate(batch, seqs, steps=60)
    for s in seqs:
        assert s.token_ids[-1] == EOS, tokenizer.decode(s.token_ids[3:])
        jsonschema.validate(json.loads(tokenizer.decode(s.token_ids[3:-1])), SCHEMA)


def test_a_recomputed_sequence_gets_its_grammar_state_back(grammars, batch):
    constraint = pb.StructuredOutputParams(json=json.dumps(SCHEMA))
    original = seq(batch, grammars.matcher(constraint, []), temperature=1.0, seed=3)
    generate(batch, [original], steps=5)
    generated = original.token_ids[3:]
    replayed = grammars.matcher(constraint, generated)  # what a NewSequence after preemption gets
    masks = xgrammar.allocate_token_bitmask(2, VOCAB)
    original.grammar.fill_next_token_bitmask(masks, 0)
    replayed.fill_next_token_bitmask(masks, 1)
    assert torch.equal(masks[0], masks[1])
    fresh = xgrammar.allocate_token_bitmask(1, VOCAB)
    grammars.matcher(constraint, []).fill_next_token_bitmask(fresh, 0)
    assert not torch.equal(masks[0], fresh[0])  # the state really moved on
