"""Flags declared once, as dataclass fields, for every process and for `pagedserve serve`.

A field made with `flag()` carries its default and help; `add_arguments` turns a dataclass's flag
fields into argparse options (`max_num_seqs` -> `--max-num-seqs`, bool -> `--x/--no-x`), and
`to_argv` turns values back into the argv of a child process, so the launcher never spells a flag
or a default again. Fields made without `flag()` (values the program derives) are not options.

The flags that several processes share (the model, its served name, the context cap, the API key,
the drain timeout, the log level) are made by the functions at the bottom: one default each.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import textwrap
import types
import typing
from typing import Any

FLAG = "pagedserve.flag"

log = logging.getLogger(__name__)


def flag(default: Any = dataclasses.MISSING, help: str = "", *, choices: list | None = None,
         group: str | None = None, env: str | None = None, short: str | None = None,
         default_factory: Any = dataclasses.MISSING, nargs: str | None = None):
    """A dataclass field that is also a command-line option.

    `env`: an environment variable whose value, when set, replaces the default. `group`: options
    of one group are mutually exclusive. A field without a default is a required option. A
    `list[str]` field takes a JSON array, as vLLM's list flags do (`--allowed-origins '["*"]'`), or
    with `nargs="+"` one or more values (`--lora-modules a=/x b=/y`)."""
    meta = {FLAG: {"help": help, "choices": choices, "group": group, "env": env, "short": short, "nargs": nargs}}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def json_list(text: str) -> list[str]:
    """A flag's JSON array of strings; argparse reports the ValueError as a bad value."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a JSON array of strings")
    return value


json_list.__name__ = "JSON list"  # argparse names the type in its error message


def flag_fields(cls, skip=()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if FLAG in f.metadata and f.name not in skip]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(cls, name: str):
    """int for `int` and `int | None`; str for str; json_list for list[str]."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return json_list if typing.get_origin(hint) is list else hint


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# Help that already says what the default is ("(default: the model directory's name)").
STATES_DEFAULT = re.compile(r"\(default|default:")


def says_default(help: str | None) -> bool:
    return bool(help) and STATES_DEFAULT.search(help) is not None


def help_with_default(help: str, default: Any, env: str | None) -> str | None:
    """A flag's help followed by its default: the declared one, so that --help never prints the
    value of an environment variable (an API key), only its name. No default (None) adds nothing;
    neither does help that already states it."""
    if says_default(help):
        return help or None
    if env:
        said = f"${env}" + (f", else {default_text(default)}" if default is not None else " if set")
    elif default is not None:
        said = default_text(default)
    else:
        return help or None
    return f"{help} (default: {said})".lstrip()


def shows_default(action: argparse.Action) -> bool:
    """Whether HelpFormatter adds the action's default to its help."""
    default = action.default
    return not (default is None or default is argparse.SUPPRESS or default in ([], "")
                or says_default(action.help)
                or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)))


def default_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return text.replace("%", "%%")  # argparse expands %-formats in help


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default after its help where there is one to say: not
    None or empty, not the False of a plain switch (`--disable-progress-bar`), not when the help
    states it already. For the options written by hand; `add_arguments` states its flags'
    defaults itself."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):  # argparse prints no line for empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not shows_default(action) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"

    # Lines broken at spaces only: never "--base-" at the end of one line and "url" on the next.
    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width,
                             initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def add_arguments(parser: argparse.ArgumentParser, cls, skip=(), required: bool | None = None,
                  seen: set[str] | None = None) -> None:
    """Adds cls's flag fields to parser (or to an argument group), except those in `skip` and
    those already in `seen` (a flag that several processes share is added once), each help
    ending with the flag's default. `required` overrides whether fields without a default are
    required."""
    groups: dict[str, Any] = {}
    seen = set() if seen is None else seen
    for f in flag_fields(cls, skip):
        if f.name in seen:
            continue
        seen.add(f.name)
        meta = f.metadata[FLAG]
        kind = value_type(cls, f.name)
        default = default_of(f)
        if meta["env"] and os.environ.get(meta["env"]):
            default = kind(os.environ[meta["env"]])
        said = help_with_default(meta["help"], default_of(f), meta["env"])
        kwargs: dict[str, Any] = {"default": default, "help": said}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("nargs"):
            kwargs.update(nargs=meta["nargs"])
        else:
            kwargs.update(type=kind, choices=meta["choices"])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True if required is None else required
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        names = [option(f.name)] + ([meta["short"]] if meta["short"] else [])
        target.add_argument(*names, **kwargs)


def from_namespace(cls, namespace: argparse.Namespace, **extra):
    """An instance of cls from parsed flags, or from an instance of a dataclass that extends cls
    (the fields `namespace` has), and `extra` values."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if hasattr(namespace, f.name)}
    return cls(**{**values, **extra})


def to_argv(values: Any, cls, skip=()) -> list[str]:
    """The argv that gives a child process cls's flags with the values of `values` (an instance
    or an argparse namespace with those attribute names). None values are left out."""
    argv: list[str] = []
    for f in flag_fields(cls, skip):
        value = getattr(values, f.name, None)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(option(f.name) if value else "--no-" + option(f.name)[2:])
        elif isinstance(value, list) and f.metadata[FLAG].get("nargs"):
            argv += [option(f.name), *value] if value else []
        elif isinstance(value, list):
            argv += [option(f.name), json.dumps(value)]
        else:
            argv += [option(f.name), str(value)]
    return argv


# ----- flags that more than one process takes ------------------------------------------------------

def model_flag(required: bool = True, help: str = "a Hugging Face model directory"):
    return flag(dataclasses.MISSING if required else None, help)


def served_model_name_flag():
    return flag(None, "the name clients pass as `model` (default: the model directory's name)")


def max_model_len_flag():
    return flag(None, "context length in tokens, prompt plus output (default, and upper bound: "
                "config.json's max_position_embeddings)")


def lower_max_model_len(flag: int | None, served: int, served_by: str) -> int:
    """The context length (tokens) a process serves: `served`, what the process it talks to serves
    (`served_by`: "worker", "scheduler"), lowered by its own --max-model-len, never raised (that
    process refuses what does not fit). The worker sets the first value, from the model
    (worker/loader.py:context_length). Raises SystemExit when neither says."""
    if not (flag or served):
        raise SystemExit(f"The {served_by} reported no max_model_len: pass --max-model-len N.")
    if flag and served and flag > served:
        log.warning("--max-model-len %d exceeds the %s's %d; using %d", flag, served_by, served,
                    served)
        return served
    return flag or served


def max_num_seqs_flag():
    return flag(256, "most sequences in one step's batch")


def api_key_flag():
    return flag(None, "require `Authorization: Bearer KEY` on the OpenAI API and the gRPC API",
                env="PAGEDSERVE_API_KEY")


def shutdown_timeout_flag():
    return flag(30.0, "seconds that requests in flight get to finish after SIGTERM")


def resume_timeout_flag():
    return flag(60.0, "seconds a request in flight may wait for a lost process to be back (a "
                "restarted worker; its KV cache is recomputed) before it fails as it would "
                "without resuming")


def log_level_flag():
    return flag("INFO", "debug, info, warning or error", env="PAGEDSERVE_LOG_LEVEL")


# LoRA adapters (vLLM's flags), shared by the worker, the scheduler and the router.
def enable_lora_flag():
    return flag(False, "serve LoRA adapters (PEFT directories) beside the base model")


def max_loras_flag():
    return flag(1, "most LoRA adapters in one step's batch (the worker's device slots)")


def max_lora_rank_flag():
    return flag(16, "largest LoRA rank served")


def speculative_config_flag():
    """--speculative-config: the scheduler proposes or asks for drafts, the workers verify them
    (and, for draft_model, load the draft); one flag, one help."""
    return flag(
        None, 'speculative decoding, as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": '
        'k, "prompt_lookup_max": n, "prompt_lookup_min": m} proposes the k tokens that followed the '
        "latest earlier match of the sequence's last m..n tokens; {\"method\": \"draft_model\", "
        '"model": DIR, "num_speculative_tokens": k} has a small model of the same vocabulary in the '
        "workers propose k greedy tokens; the workers verify them in one step (outputs keep the "
        "model's distribution; greedy ones are unchanged)")


def json_object_flag(text: str, name: str) -> dict:
    """A flag whose value is a JSON object (vLLM's --speculative-config, --pooler-config, ...),
    parsed. Raises ValueError naming the flag (`name`, e.g. "--pooler-config") when `text` is not
    JSON or not an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value
