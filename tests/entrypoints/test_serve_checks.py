"""`pagedserve serve` refuses a JSON-valued flag its process would refuse before it starts any
process: exit 2 and the process's own words, under `serve`'s name, and no model loaded."""
import pytest

from pagedserve.entrypoints import cli
from pagedserve.entrypoints.launcher import Launcher


@pytest.mark.parametrize("flags, words", [
    (["--speculative-config", '{"method": "eagle", "num_speculative_tokens": 4}'], "method 'eagle'"),
    (["--speculative-config", "{not json"], "--speculative-config is not JSON"),
    (["--pooler-config", '{"pooling": "MEAN"}'], "--pooler-config: pooling is not supported"),
    (["--enable-lora", "--lora-modules", "noequals"], "--lora-modules 'noequals'"),
])
def test_serve_refuses_a_bad_json_flag_before_starting_anything(flags, words, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(Launcher, "run", lambda self: started.append(self) or 0)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model", "m", *flags])
    assert exit_.value.code == 2 and not started
    err = capsys.readouterr().err
    assert "pagedserve serve: error:" in err and words in err


def test_serve_starts_when_the_json_flags_parse(monkeypatch):
    started = []
    monkeypatch.setattr(Launcher, "run", lambda self: started.append(self) or 0)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model", "m", "--speculative-config",
                  '{"method": "ngram", "num_speculative_tokens": 2}',
                  "--pooler-config", '{"pooling_type": "MEAN"}', "--lora-modules", "a=/x"])
    assert exit_.value.code == 0 and len(started) == 1
