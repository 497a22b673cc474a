"""The CLI: every subcommand's --help has an example; user mistakes are one clear line and
a non-zero exit code, never a traceback."""

from __future__ import annotations

import argparse

import pytest

from itap_stream.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_help_has_an_example(capsys):
    commands = list(_subcommands(build_parser()))
    assert len(commands) >= 16
    for words, _sub in commands:
        with pytest.raises(SystemExit) as exit_:
            main([*words, "--help"])
        assert exit_.value.code == 0
        assert "example" in capsys.readouterr().out, " ".join(words)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--csv", "/no/such.csv", "--model", "/tmp/never.joblib"], "CSV file not found: /no/such.csv"),
        (["score", "--csv", "/no/such.csv", "--model", "/no/model.joblib"], "model artifact not found"),
        (["rules", "test", "--rules", "/no/rules.yaml"], "alert rules file not found"),
        (["ack", "abc", "--broker", "mqtt://127.0.0.1:1"], "cannot reach MQTT broker at 127.0.0.1:1"),
        (["silence", "list", "--broker", "mqtt://127.0.0.1:1"], "cannot reach MQTT broker at 127.0.0.1:1"),
        (["alerts", "--broker", "mqtt://127.0.0.1:1", "--timeout", "1"], "cannot reach MQTT broker"),
    ],
)
def test_user_mistakes_are_one_clear_line_and_a_non_zero_exit(argv, message, capsys):
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_bad_yaml_config_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "itap.yaml"
    bad.write_text("window: [\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML at line 2" in err[0]
