"""Every command answers --help with its usage and exit status 0 (the README sends users there)."""

import pytest

from prep.cli import build_parser, main

COMMANDS = [["run"], ["verify"], ["export", "webdataset"], ["push"], ["curate"], ["prune"], ["report"],
            ["tiny-models"], ["demo"], ["bench"]]


def test_the_list_names_every_command():
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    assert {words[0] for words in COMMANDS} == set(subparsers.choices)


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words))
def test_every_command_answers_help(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    if words == ["bench"]:  # the benchmark suite's own parser
        assert out.startswith("usage: python -m prep.bench") and "--quick" in out
    else:
        assert out.startswith(f"usage: prep {' '.join(words)}")
