"""Edges of the command line: clear one-line errors, before any model loads, and no files left behind."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from rewardsvc.cli import main as cli
from rewardsvc.cli import serve

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_score_with_a_missing_input_fails_before_loading_and_leaves_no_output(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run("rewardsvc.cli", "score", str(tmp_path / "missing.jsonl"), "-o", str(out), "--model", str(tmp_path / "no-model"))
    assert proc.returncode == 2 and "missing.jsonl does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# The two below load the scorer module (torch): run in this process, where torch is loaded already, they
# cost milliseconds instead of seconds of a fresh interpreter each.


def test_a_missing_model_directory_says_it_does_not_exist(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi", "response": "hello"}\n')
    assert cli.main(["score", str(src), "--model", str(tmp_path / "nope")]) == 2
    stderr = capsys.readouterr().err
    assert "does not exist" in stderr and "neither" not in stderr, stderr


def test_serve_with_a_bad_model_is_one_clear_line(tmp_path, capsys):
    assert serve.main(["--port", "0", "--model", str(tmp_path / "nope")]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "error: cannot load the model" in stderr and "does not exist" in stderr, stderr


def test_train_without_data_names_the_flag(tmp_path):
    proc = run("rewardsvc.cli", "train", "--out", str(tmp_path / "heads"), "--data-dir", str(tmp_path / "no-data"))
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_train_cap_must_name_a_source_and_a_number(tmp_path, capsys):
    """--cap is parsed before torch loads; a value that is not STAGE/SOURCE=N is one line naming the flag."""
    for bad in ("stage1/arena-bench", "stage1/arena-bench=few"):
        assert cli.main(["train", "--out", str(tmp_path / "heads"), "--data-dir", str(tmp_path), "--cap", bad]) == 2
        stderr = capsys.readouterr().err
        assert "--cap: expected STAGE/SOURCE=N" in stderr and repr(bad) in stderr and "Traceback" not in stderr, stderr


def test_train_state_cache_needs_an_adapter(tmp_path, capsys):
    """--state-cache without --adapter is refused before torch loads, naming both flags."""
    assert cli.main(["train", "--out", str(tmp_path / "heads"), "--data-dir", str(tmp_path), "--state-cache", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert "--state-cache needs --adapter" in stderr and "Traceback" not in stderr, stderr


def test_train_caps_combine_the_scale_and_each_cap():
    from rewardsvc.cli.train import add_arguments, caps_from
    from rewardsvc.training.data.build import DEFAULT_CAPS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plain = parser.parse_args(["--out", "x"])
    assert caps_from(plain) is None  # the defaults, untouched
    ablation = parser.parse_args(["--out", "x", "--cap", "stage1/arena-bench=0", "--cap", "eval/xstest=none"])
    assert caps_from(ablation) == {"stage1/arena-bench": 0, "eval/xstest": None}
    scaled = caps_from(parser.parse_args(["--out", "x", "--caps-scale", "0.5", "--cap", "eval/pandalm=7"]))
    assert scaled["eval/pandalm"] == 7 and scaled["eval/hh-harmless"] == round(DEFAULT_CAPS["eval/hh-harmless"] * 0.5)


def test_train_choices_are_the_configs_own():
    """The CLI spells out --length-calibration, --embed and --stage2-pairs choices (importing train_config would load torch for
    every --help); they must stay the ones TrainConfig accepts."""
    from rewardsvc.cli.train import add_arguments
    from rewardsvc.training.train_config import EMBED_MODES, LENGTH_CALIBRATIONS, STAGE2_PAIRS, TrainConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices}
    assert choices["length_calibration"] == LENGTH_CALIBRATIONS and choices["embed"] == EMBED_MODES
    assert choices["stage2_pairs"] == STAGE2_PAIRS and parser.get_default("stage2_pairs") == TrainConfig("o", "w").stage2_pairs
