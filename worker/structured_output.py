"""Structured outputs in the worker: constraints (JSON schema, regex, choice, EBNF grammar)
compiled with xgrammar against the served tokenizer, one grammar matcher per constrained sequence,
and the token bitmask applied to those sequences' rows of the logits only.

Why the worker advances the grammar (and not the scheduler): the worker samples, so it sees each
token the moment it exists and can fill the next step's mask from the matcher it just advanced;
no bitmask ([vocab / 32] int32 per row) crosses gRPC, and the scheduler stays free of torch and of
the tokenizer. A sequence that comes back after preemption arrives with its generated tokens
(NewSequence.num_generated): they are replayed into a fresh matcher, which restores its state.
With tensor parallelism every rank samples the same tokens (same logits, same generator), so each
rank advances its own matcher identically; nothing has to be broadcast.

Compiled grammars are cached by xgrammar's GrammarCompiler (keyed by the constraint's kind and
text), so a schema is compiled once however many requests use it. xgrammar is imported on first
use: it brings transformers along, which a worker serving no constraint need not load.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import torch

from pagedserve.v1 import scheduler_pb2

log = logging.getLogger(__name__)

# xgrammar's messages start with "[hh:mm:ss] /project/cpp/file.cc:123: ": not the client's concern.
CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class ConstraintError(ValueError):
    """The constraint does not compile: the message says why."""


def constraint_kind(p: scheduler_pb2.StructuredOutputParams) -> tuple[str, str]:
    """(kind, spec) of the one field set, as xgrammar compiles it; raises ConstraintError when
    none or several are set."""
    given = [(k, v) for k, v in (("json", p.json), ("regex", p.regex), ("grammar", p.grammar)) if v]
    if p.choice:
        given.append(("grammar", choice_grammar(list(p.choice))))
    if p.json_object:
        given.append(("json", '{"type": "object"}'))
    if len(given) != 1:
        raise ConstraintError("set exactly one of json, regex, choice, grammar, json_object; "
                              f"got {len(given)}")
    return given[0]


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are the choices (JSON string escapes are EBNF's too)."""
    if any(not c for c in choices):
        raise ConstraintError("choice: the choices must be non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """The compiler for one served model, built on first use (loading the tokenizer's vocabulary
    takes a fraction of a second, which servers that never see a constraint should not pay)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self.model_dir = str(model_dir)
        self.vocab_size = vocab_size  # config.json's: may exceed the tokenizer's (padded rows)
        self.eos_token_ids = list(eos_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()  # the check RPC and the step thread may both build it

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                info = xgrammar.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, p: scheduler_pb2.StructuredOutputParams) -> xgrammar.CompiledGrammar:
        """Raises ConstraintError naming the problem."""
        kind, spec = constraint_kind(p)
        try:
            if kind == "json":
                return self.compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            return self.compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConstraintError(f"{kind}: {CPP_PREFIX.sub('', str(e)).strip()}") from None

    def check(self, p: scheduler_pb2.StructuredOutputParams) -> str:
        """'' when it compiles, else why not."""
        try:
            self.compile(p)
        except ConstraintError as e:
            return str(e)
        return ""

    def matcher(self, p: scheduler_pb2.StructuredOutputParams,
                generated: list[int]) -> xgrammar.GrammarMatcher:
        """A matcher at the start of the output, with the tokens already generated replayed."""
        import xgrammar
        matcher = xgrammar.GrammarMatcher(self.compile(p))
        for token in generated:
            if not matcher.accept_token(token):
                log.warning("a recomputed sequence's token %d does not fit its grammar", token)
                break
        return matcher


def apply_bitmask(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Masks, in place, the rows of `logits` ([S, vocab] float32) whose sequence has a live
    grammar matcher (`seq.grammar`): tokens the grammar forbids get -inf. Other rows are not
    touched, so a batch without constraints pays one Python pass over the sequences."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.grammar.is_terminated()]
    if not rows:
        return logits
    import xgrammar
    bitmask = xgrammar.allocate_token_bitmask(len(seqs), logits.shape[-1])
    for i in rows:
        seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return logits


def advance(seqs, tokens: list[int]) -> None:
    """Feeds each constrained sequence's sampled token to its matcher."""
    for seq, token in zip(seqs, tokens):
        if seq.grammar is not None and not seq.grammar.is_terminated():
            if not seq.grammar.accept_token(token):  # only when min_tokens banned the grammar's EOS
                log.warning("sequence %d: token %d rejected by its grammar", seq.seq_id, token)
