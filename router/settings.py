"""What the router is started with: the flags of `python -m pagedserve.router` (those made with `flag()`,
which `pagedserve serve` takes too) and the timings it uses."""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.flags import (api_key_flag, enable_lora_flag, flag, log_level_flag,
                              max_lora_rank_flag, max_model_len_flag, model_flag,
                              resume_timeout_flag, served_model_name_flag, shutdown_timeout_flag)
from pagedserve.router.reasoning_parsers import PARSERS as REASONING_PARSERS
from pagedserve.router.routing import POLICIES
from pagedserve.router.tool_parsers import PARSERS


@dataclass
class Settings:
    scheduler_addr: str = flag("127.0.0.1:50051", "the scheduler's gRPC address")
    model: str | None = model_flag(
        required=False, help="model directory (its tokenizer and chat template); default: the "
        "model_path the scheduler reports")
    served_model_name: str | None = served_model_name_flag()
    api_key: str | None = api_key_flag()
    chat_template: str | None = flag(None, "a Jinja chat template file replacing the tokenizer's")
    max_model_len: int | None = max_model_len_flag()  # may only lower the scheduler's limit
    max_request_body_bytes: int = flag(16 << 20, "answer 413 to larger request bodies (0: no limit)")
    # CORS (router/cors.py), vLLM's four flags: off unless origins are given.
    allowed_origins: list[str] | None = flag(
        None, 'origins allowed to call the API from a browser, as JSON: \'["*"]\' or '
        '\'["https://app.example"]\'; default: CORS off')
    allowed_methods: list[str] = flag(help="HTTP methods allowed across origins, as JSON (with "
                                      "--allowed-origins)", default_factory=lambda: ["*"])
    allowed_headers: list[str] = flag(help="request headers allowed across origins, as JSON (with "
                                      "--allowed-origins)", default_factory=lambda: ["*"])
    allow_credentials: bool = flag(False, "let browsers send cookies and auth headers across origins")
    # Tool calls (router/tool_calls.py), vLLM's flags: "auto" parses calls out of the reply's text.
    enable_auto_tool_choice: bool = flag(False, 'allow tool_choice "auto" (needs --tool-call-parser)')
    tool_call_parser: str | None = flag(None, 'how tool calls are found in the text of tool_choice '
                                        '"auto" replies', choices=sorted(PARSERS))
    # Reasoning models (router/reasoning_parsers.py), vLLM's flag: the thinking kept apart.
    reasoning_parser: str | None = flag(None, "split the model's thinking (<think>...</think>) "
                                        "from its answer: chat's reasoning_content and "
                                        "reasoning, the Responses API's reasoning items",
                                        choices=sorted(REASONING_PARSERS))
    # The Responses API's store (router/response_store.py): in this router's memory only.
    max_stored_responses: int = flag(1000, "responses kept for GET /v1/responses/{id} and "
                                     "previous_response_id, least recently used evicted first; "
                                     "lost on restart, not shared between routers (0: none)")
    # Replicas (router/replicas.py) and routing between them (router/routing.py).
    scheduler_addrs: str | None = flag(
        None, "the schedulers of several replicas, host:port,host:port; a name that resolves to "
        "several addresses (a Kubernetes headless Service) is one replica per address, resolved "
        "again every few seconds (default: --scheduler-addr alone)")
    routing_policy: str | None = flag(
        None, "how a request's replica is chosen (default: cache_aware with several replicas)",
        choices=list(POLICIES))
    session_header: str = flag("x-session-id", "the request header whose value picks the "
                               "replica under --routing-policy session")
    cache_threshold: float = flag(0.5, "cache_aware: the share of the prompt that must match a "
                                  "replica's sent prefixes for it to get the request")
    balance_abs_threshold: int = flag(32, "cache_aware: requests in flight by which the busiest "
                                      "replica must exceed the idlest to count as imbalanced")
    balance_rel_threshold: float = flag(1.5, "cache_aware: ...and the ratio of their loads it "
                                        "must exceed; then the idlest replica gets the request")
    max_tree_size: int = flag(1 << 20, "cache_aware: tokens of sent prefixes remembered per "
                              "replica (least recently used go first)")
    # a request whose scheduler went away waits for it (restarted) or another replica
    resume_timeout: float = resume_timeout_flag()
    metrics_prefix: str = flag(
        "pagedserve", "the prefix of vLLM's metric names at /metrics: vllm gives vLLM's own "
        "(vllm:num_requests_waiting...), for routers and autoscalers written for vLLM",
        choices=["pagedserve", "vllm"])
    # LoRA adapters (router/lora.py), vLLM's flags: requests pick one by `model`.
    enable_lora: bool = enable_lora_flag()
    lora_modules: list[str] | None = flag(
        None, "LoRA adapters served from start-up, each name=path or JSON "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\' (with --enable-lora)', nargs="+")
    max_lora_rank: int = max_lora_rank_flag()
    connect_timeout_s: float = 3.0        # how long a request waits for a down scheduler: then 503
    startup_retry_s: float = 2.0          # pause between GetModelInfo attempts at startup
    health_interval_s: float = 1.0        # between two health checks of every replica
    health_timeout_s: float = 1.0         # a replica that takes longer to answer is unhealthy
    dns_refresh_s: float = 5.0            # between two resolutions of the replicas' names


@dataclass
class RouterArgs(Settings):
    """The router's flags: its settings, and where it listens."""

    host: str = flag("0.0.0.0")
    port: int = flag(8000, "HTTP port of the OpenAI API")
    shutdown_timeout: float = shutdown_timeout_flag()
    log_level: str = log_level_flag()
