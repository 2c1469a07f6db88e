"""`--help` states every option's default: `pagedserve serve`, `run-batch`, `bench ...` and the
processes' own CLIs. Checked on the text argparse prints, entry by entry; no entry says
"(default: None)", and the API key an environment variable holds is never printed."""
from __future__ import annotations

import argparse
import re

import pytest

from pagedserve.entrypoints.cli import build_parser, subcommand
from pagedserve.flags import add_arguments
from pagedserve.router.__main__ import parse_args as router_parse_args
from pagedserve.router.settings import RouterArgs
from pagedserve.scheduler.__main__ import parse_args as scheduler_parse_args
from pagedserve.scheduler.config import SchedulerArgs, SchedulerConfig
from pagedserve.worker.__main__ import parse_args as worker_parse_args
from pagedserve.worker.config import WorkerArgs

SECRET = "sk-not-for-help"


@pytest.fixture(autouse=True)
def wide_and_keyed(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("PAGEDSERVE_API_KEY", SECRET)  # read when the parsers are built


def entries(text: str) -> list[str]:
    """The option entries of a --help text, each on one line (argparse starts each at two spaces
    and a dash, and indents its help's further lines deeper)."""
    found: list[str] = []
    for line in text.splitlines():
        if re.match(r"  -", line):
            found.append(line.strip())
        elif found and line.startswith("    "):
            found[-1] += " " + line.strip()
    return [" ".join(e.split()) for e in found]


def entry(text: str, parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    invocation = parser._get_formatter()._format_action_invocation(action)
    [found] = [e for e in entries(text) if e.startswith(invocation + " ") or e == invocation]
    return found


def has_a_default(action: argparse.Action) -> bool:
    """What any user would call a default: a value, not None, [] or a plain switch's False."""
    return (action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
            and not (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)))


def check_states_defaults(text: str, parser: argparse.ArgumentParser) -> None:
    assert "(default: None)" not in text and SECRET not in text
    for action in parser._actions:
        if has_a_default(action):
            assert "default" in entry(text, parser, action), action.dest


def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    bench = subcommand(top, "bench")
    parsers = {name: subcommand(top, name) for name in ("serve", "run-batch")}
    parsers.update({f"bench {name}": subcommand(bench, name)
                    for name in ("serve", "compare", "compare-hf", "host", "one-user", "kernels")})
    return parsers


@pytest.mark.parametrize("command", list(cli_parsers()))
def test_pagedserve_help_states_defaults(command):
    parser = cli_parsers()[command]
    check_states_defaults(parser.format_help(), parser)


def test_defaults_are_the_values_each_command_runs_with():
    parsers = cli_parsers()

    def said(command: str, dest: str) -> str:
        parser = parsers[command]
        action = next(a for a in parser._actions if a.dest == dest)
        return entry(parser.format_help(), parser, action)

    assert said("serve", "max_num_seqs").endswith("(default: 256)")
    assert said("serve", "enable_prefix_caching").endswith("(default: True)")
    assert said("serve", "allowed_methods").endswith('(default: ["*"])')
    assert said("serve", "api_key").endswith("(default: $PAGEDSERVE_API_KEY if set)")
    assert said("serve", "log_level").endswith("(default: $PAGEDSERVE_LOG_LEVEL, else INFO)")
    assert said("bench serve", "num_prompts").endswith("(default: 64)")
    assert said("bench host", "num_prompts").endswith("(default: 256)")  # the host workload's
    assert said("bench kernels", "device") == "--device {cpu,cuda} (default: cpu)"
    assert "default" not in said("run-batch", "disable_progress_bar")


@pytest.mark.parametrize("parse, classes", [
    (router_parse_args, [RouterArgs]),
    (scheduler_parse_args, [SchedulerArgs, SchedulerConfig]),
    (worker_parse_args, [WorkerArgs]),
])
def test_each_process_help_states_defaults(parse, classes, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    same = argparse.ArgumentParser()  # built as the process builds its own: for the invocations
    for cls in classes:
        add_arguments(same, cls)
    check_states_defaults(text, same)
    port = next(a for a in same._actions if a.dest == "port")
    assert entry(text, same, port).endswith(f"(default: {port.default})")
