"""The model being served, as the router knows it: the scheduler's ModelInfo and the tokenizer."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pagedserve.flags import lower_max_model_len
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.lora import LoraRegistry, lora_registry
from pagedserve.router.settings import Settings
from pagedserve.router.tokenizer import Tokenizer


@dataclass
class ServedModel:
    name: str
    path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    tokenizer: Tokenizer
    created: int
    tool_call_parser: str | None = None  # set with --enable-auto-tool-choice: tool_choice "auto"
    reasoning_parser: str | None = None  # --reasoning-parser
    runner: str = "generate"  # "pooling": served for /v1/embeddings only (ModelInfo.runner)
    loras: LoraRegistry | None = None  # with --enable-lora: the adapters served (router/lora.py)


def load_served_model(settings: Settings, info: pb.ModelInfo) -> ServedModel:
    model = settings.model or info.model_path
    if not model:
        raise SystemExit("No model directory: pass --model DIR (the scheduler reported none).")
    # a GGUF file holds no tokenizer: the worker reports --tokenizer's directory as its model_path
    path = info.model_path if model.endswith(".gguf") and info.model_path else model
    template = Path(settings.chat_template).read_text() if settings.chat_template else None
    tokenizer = Tokenizer(path, template)
    name = (settings.served_model_name or info.served_model_name
            or os.path.basename(os.path.normpath(model)))
    max_len = lower_max_model_len(settings.max_model_len, info.max_model_len, "scheduler")
    eos = frozenset(info.eos_token_ids) or frozenset(
        [tokenizer.hf.eos_token_id] if tokenizer.hf.eos_token_id is not None else [])
    # The model's vocabulary can be padded past the tokenizer's: any id below it is valid input.
    vocab = info.vocab_size or len(tokenizer)
    parser = settings.tool_call_parser if settings.enable_auto_tool_choice else None
    return ServedModel(name, path, max_len, vocab, eos, tokenizer, int(time.time()), parser,
                       settings.reasoning_parser, runner=info.runner or "generate",
                       loras=lora_registry(settings, path, name))

