"""The model directory's tokenizer, as the router uses it: encode, decode, chat templates, and the
bytes behind each token (for logprobs)."""
from __future__ import annotations

import functools
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from pagedserve.router.errors import invalid

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback
PROBE = "pagedserve_probe_tool"  # a name no template writes unless it renders what holds it
GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_hf_tokenizer(model_dir: Path):
    """The directory's tokenizer. AutoTokenizer reaches torch through transformers' model configs
    (seconds of startup, hundreds of MB, for a process that never touches a tensor); the generic
    fast-tokenizer class does not, so it is used whenever the directory asks for nothing else."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    generic = config.get("tokenizer_class") in GENERIC_CLASSES
    if generic and (model_dir / "tokenizer.json").is_file():
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
        return TokenizersBackend.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of byte-level BPE back to raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        self.hf = load_hf_tokenizer(Path(model_dir))
        self.fast = self.hf.backend_tokenizer
        self.chat_template = chat_template
        decoder = json.loads(self.fast.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)
        self._alphabet = byte_level_alphabet()
        self.special_ids = frozenset(self.hf.all_special_ids)
        self.token_bytes = lru_cache(maxsize=1 << 16)(self._token_bytes)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # The Rust decoder directly: it runs for every generated token.
        return self.fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool) -> Callable[[list[int]], str]:
        """decode() with its flag bound: the Rust decoder itself, called twice per generated
        token by the detokenizer (ids must be a list)."""
        return functools.partial(self.fast.decode, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict | None = None,
                    tools: list[dict] | None = None) -> str:
        """The chat template applied to the messages (and the OpenAI `tools`, for templates that
        describe them to the model), as text that still has to be encoded. `template_kwargs` (vLLM's
        chat_template_kwargs) reach the template as variables."""
        if self.chat_template is None and not getattr(self.hf, "chat_template", None):
            raise invalid("messages", "This model has no chat template; start the router with "
                          "--chat-template FILE or use /v1/completions.")
        try:
            return self.hf.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, tools=tools or None,
                continue_final_message=continue_final_message, **(template_kwargs or {}))
        except Exception as exc:  # jinja's raise_exception, e.g. roles that do not alternate
            raise invalid("messages", f"The chat template rejected the messages: {exc}") from exc

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template writes the `tools` it is given (many have no such variable
        and drop them): a probe tool rendered, and looked for in the text."""
        tool = {"type": "function", "function": {"name": PROBE, "description": PROBE,
                                                 "parameters": {"type": "object"}}}
        return self._shows_probe([{"role": "user", "content": "x"}], [tool])

    @functools.cached_property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template writes an assistant message's `tool_calls`."""
        call = {"id": "call_0", "type": "function", "function": {"name": PROBE, "arguments": {}}}
        return self._shows_probe([{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "call_0", "content": "y"},
                                  {"role": "user", "content": "z"}], None)

    def _shows_probe(self, messages: list[dict], tools: list[dict] | None) -> bool:
        try:
            return PROBE in self.render_chat(messages, tools=tools)
        except Exception:  # noqa: BLE001 - a template that refuses the probe does not render it
            return False

    def _token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for: may be part of a UTF-8 character."""
        piece = self.fast.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.special_ids:
            return piece.encode()
        if self._byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        byte = BYTE_TOKEN.match(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_str(self, token_id: int) -> str:
        """A token as OpenAI shows it in logprobs: its text, or `bytes:\\xNN` if not UTF-8."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
