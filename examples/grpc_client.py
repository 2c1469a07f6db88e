"""A pagedserve gRPC client that needs nothing from pagedserve but its .proto files.

It imports only grpcio, tokenizers (>= 0.21, for the model's tokenizer.json) and the stubs that
the standard command generates from protos/ (see docs/grpc.md):

    python -m grpc_tools.protoc -I protos --python_out=OUT --grpc_python_out=OUT \
        protos/pagedserve/v1/*.proto
    PYTHONPATH=OUT python examples/grpc_client.py --target localhost:50051 \
        --model-dir models/SmolLM2-135M-Instruct --max-tokens 32 "The capital of France is"

The prompt is tokenized as it is, without a chat template, as /v1/completions does. The answer is
printed as it streams; --json adds one final line {"token_ids", "text", "finish_reason"}.
Generation is greedy unless --temperature is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pb_grpc

# The OpenAI API's names for the finish reasons (FINISH_REASON_STOP -> "stop").
FINISH_REASONS = {value: name.removeprefix("FINISH_REASON_").lower()
                  for name, value in pb.FinishReason.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="localhost:50051", help="the scheduler's HOST:PORT")
    p.add_argument("--model-dir", required=True, help="the served model's directory (tokenizer.json)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="the server's --api-key (default: $PAGEDSERVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of the call, in seconds")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result")
    p.add_argument("prompt")
    return p.parse_args(argv)


def request_for(args, prompt_ids: list[int]) -> pb.GenerateRequest:
    params = pb.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.seed is not None:
        params.seed = args.seed
    return pb.GenerateRequest(prompt_token_ids=prompt_ids, params=params)


def generate(stub, request, metadata, timeout: float, tokenizer: Tokenizer):
    """Streams the answer to stdout; returns its token ids and finish reason."""
    token_ids: list[int] = []
    finish_reason = pb.FINISH_REASON_UNSPECIFIED
    # UTF-8 safe: a character split across tokens is printed once its last byte has arrived.
    text_stream = DecodeStream(skip_special_tokens=True)
    for reply in stub.Generate(request, metadata=metadata, timeout=timeout):
        for token_id in reply.token_ids:
            chunk = text_stream.step(tokenizer, token_id)
            if chunk:
                print(chunk, end="", flush=True)
        token_ids.extend(reply.token_ids)
        finish_reason = reply.finish_reason or finish_reason
    print(flush=True)
    return token_ids, FINISH_REASONS[finish_reason]


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    prompt_ids = tokenizer.encode(args.prompt).ids
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        try:
            token_ids, finish_reason = generate(stub, request_for(args, prompt_ids), metadata,
                                                args.timeout, tokenizer)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        print(json.dumps({"token_ids": token_ids, "text": text, "finish_reason": finish_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
