"""`pagedserve run-batch`'s flags, in process: every flag it shows takes effect or is refused by
name. It does not offer the ports it chooses itself, refuses beside --base-url the server flags a
running server would not hear, and fails at once when --base-url does not answer."""
from __future__ import annotations

import argparse
import json
import os
import time

import pytest
from tokenizers import Tokenizer

from pagedserve.entrypoints.cli import build_parser, main, subcommand
from pagedserve.entrypoints.local_server import CHOSEN_HERE, LocalServer, serve_args
from tests.helpers.router_fixtures import Harness, free_port

EOS = 2  # <|im_end|>
LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
        "body": {"model": "smol", "prompt": "Hi", "max_tokens": 3}}


def run(argv: list[str]) -> int:
    """`pagedserve ARGV`'s exit status."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code


@pytest.fixture
def files(tmp_path) -> list[str]:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(LINE) + "\n")
    return ["run-batch", "-i", str(requests), "-o", str(tmp_path / "results.jsonl"),
            "--disable-progress-bar"]


def dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def test_run_batch_takes_every_serve_flag_but_the_address_it_chooses():
    parser = build_parser()
    serve, batch = subcommand(parser, "serve"), subcommand(parser, "run-batch")
    assert dests(serve) - dests(batch) == set(CHOSEN_HERE) == {"host", "port", "grpc_port"}
    args = batch.parse_args(["-i", "x", "-o", "y", "--model", "m", "--max-num-seqs", "7"])
    local = LocalServer(args)
    try:
        assert (local.args.host, local.args.max_num_seqs) == ("127.0.0.1", 7)
        assert local.root_url == f"http://127.0.0.1:{local.args.port}"
        assert local.args.grpc_port != local.args.port
    finally:
        local.stop()
        os.unlink(local.log_path)


@pytest.mark.parametrize("flag", ["--host", "--port", "--grpc-port"])
def test_the_address_flags_are_refused_by_name(files, flag, capsys):
    assert run(files + ["--model", "m", flag, "1"]) == 2
    assert f"unrecognized arguments: {flag} 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", CHOSEN_HERE)
def test_the_offline_server_refuses_the_address_flags_by_name(name):
    with pytest.raises(TypeError, match=f"'{name}' is chosen by the local server"):
        serve_args("m", **{name: 1})


@pytest.mark.parametrize("given, named", [
    (["--model", "m"], ["--model"]),
    (["--max-num-seqs", "256"], ["--max-num-seqs"]),  # the default, but given: still ignored
    (["-tp", "2", "--no-enable-prefix-caching", "--api-key", "k"],
     ["--tensor-parallel-size", "--enable-prefix-caching"]),
    (["--served", "x", "--max-concurrency", "3"], ["--served-model-name"]),  # an abbreviation
])
def test_server_flags_beside_base_url_are_refused_by_name(files, given, named, capsys):
    assert run(files + ["--base-url", "http://127.0.0.1:1/v1", *given]) == 2
    err = capsys.readouterr().err
    message = err[err.index("error:"):]
    for flag in ("--model", "--max-num-seqs", "--tensor-parallel-size",
                 "--enable-prefix-caching", "--served-model-name", "--api-key",
                 "--max-concurrency"):
        assert (flag in message.split("would be ignored")[0]) == (flag in named), (flag, message)


def test_an_unreachable_base_url_fails_at_once(files, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with open(files[2], "a") as requests:
        requests.write("not json\n")  # a line that gets an error record once a run goes ahead
    started = time.monotonic()
    assert run(files + ["--base-url", f"{url}/v1", "--api-key", "k", "--max-concurrency", "2"]) == 1
    assert time.monotonic() - started < 5  # the retries of one request alone take 6 s
    err = capsys.readouterr().err
    assert f"cannot reach {url}/v1/models" in err
    assert "failed 4 times" not in err
    assert not (tmp_path / "results.jsonl").exists()  # nothing written, not even the bad lines' errors


@pytest.fixture(scope="module")
def router_with_key(model_dir):
    harness = Harness(str(model_dir), Tokenizer.from_file(str(model_dir / "tokenizer.json"))
                      .get_vocab_size(), [EOS])
    yield harness, harness.router(api_key="right")
    harness.close()


def test_a_wrong_api_key_fails_at_once_and_the_right_one_runs(files, tmp_path, router_with_key,
                                                              capsys):
    harness, router = router_with_key
    harness.fake.reset()
    assert run(files + ["--base-url", router.url, "--api-key", "wrong"]) == 1
    assert "refused the API key (HTTP 401)" in capsys.readouterr().err
    assert harness.fake.requests == []

    assert run(files + ["--base-url", f"{router.url}/v1", "--api-key", "right"]) == 0
    [result] = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["custom_id"] == "a" and result["response"]["status_code"] == 200
    assert result["response"]["body"]["usage"]["completion_tokens"] == 3
