"""``megatron-stgc train --help``: every flag has a one-line help read from the comment of its
config field (config_help.py, one source of truth); an unknown flag or YAML key is a short
error with the closest known names (difflib), not a usage dump."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_stgc import cli
from megatron_stgc.config import (ConfigError, ModelConfig, SECTIONS, build_arg_parser,
                                  load_yaml, parse_run_config)
from megatron_stgc.config_help import field_help


def _flag_actions():
    return [a for a in build_arg_parser()._actions
            if a.option_strings and a.help not in (None, argparse.SUPPRESS)
            and a.dest not in ("help", "config")]


def test_every_flag_has_help_beyond_its_section_and_default():
    actions = _flag_actions()
    assert len(actions) > 80
    for action in actions:
        text, _, bracket = action.help.rpartition(" [")
        assert text.strip(), f"{action.option_strings[0]} has no help (add a comment to its field)"
        assert bracket.endswith("]")


def test_help_is_the_field_comment():
    by_dest = {a.dest: a.help for a in _flag_actions()}
    assert by_dest["num_layers"].startswith("decoder layers of the language model [model")
    # a comment above the field (two lines) is joined
    assert by_dest["moe_expert_capacity_factor"].startswith(
        "tokens an expert takes at most, as a multiple of its even share; the rest are dropped "
        "(None = no dropping; MoE-LLaVA: 1.5)")
    # STGC's fields are documented in its docstring
    assert by_dest["stgc_estimator_rank"].startswith('r for the "lowrank" estimator. [stgc')
    assert all(field_help(cls)[f.name] for cls in SECTIONS.values()
               for f in dataclasses.fields(cls))
    assert field_help(ModelConfig)["num_layers"] == "decoder layers of the language model"


def test_help_prints(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--hidden-size" in out and "width of the language model's hidden states" in out


def test_unknown_flag_names_the_closest(capsys):
    with pytest.raises(SystemExit) as done:
        parse_run_config(["--hiden-size", "8", "--bogus-thing", "1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized argument --hiden-size (did you mean --hidden-size" in err
    assert "unrecognized argument --bogus-thing" in err
    assert len(err.splitlines()) <= 3 and "--num-experts" not in err  # no usage dump


def test_a_prefix_is_not_a_flag(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--num-layer", "3"])  # allow_abbrev=False, as Megatron-LM
    assert "did you mean --num-layers" in capsys.readouterr().err


def test_unknown_yaml_key_names_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_layer: 3\nmodel:\n  hidden_sise: 4\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(str(path))
    lines = str(error.value).splitlines()
    assert len(lines) == 2  # both keys, no list of every known key
    assert "unknown key 'hidden_sise' (did you mean hidden_size" in lines[0]
    assert "unknown key 'num_layer' (did you mean num_layers" in lines[1]
