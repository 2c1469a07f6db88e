"""What the router is started with (the flags of `python -m router`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    scheduler_addr: str = "127.0.0.1:50051"
    model: str | None = None              # tokenizer dir; default: the scheduler's model_path
    served_model_name: str | None = None  # default: the scheduler's, else the dir's basename
    api_key: str | None = None            # when set, /v1/* and /tokenize need `Bearer <key>`
    chat_template: str | None = None      # a Jinja file replacing the tokenizer's template
    max_model_len: int | None = None      # may only lower the scheduler's limit
    connect_timeout_s: float = 3.0        # how long a request waits for a down scheduler: then 503
    startup_retry_s: float = 2.0          # pause between GetModelInfo attempts at startup
    max_request_body_bytes: int = 16 << 20  # larger bodies get 413; 0: no limit
    enable_auto_tool_choice: bool = False  # tool_choice "auto" allowed (needs tool_call_parser)
    tool_call_parser: str | None = None    # how "auto" finds calls in the text: router/tool_parsers.py
