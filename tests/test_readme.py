"""The README is a contract: its two commands, every flag (here or in docs/flags.md), its length,
its links, short run-script headers, and a quick start that runs."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dataloader.datasets import get_spec
from MoMKE.config import build_parser
from MoMKE.runtime import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FLAGS_PAGE = ROOT / "docs" / "flags.md"
RUN_SCRIPTS = sorted(ROOT.glob("run_MoMKE_*.sh"))


def test_first_screen_gives_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:20])
    assert "python -m pip install -r requirements.txt && sh run_MoMKE_cmumosi.sh" in first_screen
    assert "python -m pytest tests" in first_screen


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest tests" in (ROOT / ".ci" / "run").read_text()


def _undocumented(flags: set[str]) -> set[str]:
    """The flags written neither in README.md nor in docs/flags.md (`--no-x` counts as `--x`)."""
    documented = set(re.findall(r"--[a-z0-9-]+", README + FLAGS_PAGE.read_text()))
    return {f for f in flags if f not in documented and f.replace("--no-", "--") not in documented}


def test_every_training_flag_is_documented():
    flags = {option for action in build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"}
    missing = _undocumented(flags)
    assert not missing


def test_every_sweep_flag_is_documented(monkeypatch, capsys):
    # `python -m MoMKE.sweep --help`, run in this process: the command users type, wherever the
    # sweep's code lives.
    monkeypatch.setattr(sys, "argv", ["python -m MoMKE.sweep", "--help"])
    with warnings.catch_warnings():
        # runpy warns when MoMKE.sweep is imported already (by another test); that is expected.
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as done:
            runpy.run_module("MoMKE.sweep", run_name="__main__")
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)) - {"--help"}
    assert "--seeds" in flags and "--jobs" in flags
    assert not _undocumented(flags)


def test_the_readme_reads_in_five_minutes():
    assert len(README.splitlines()) <= 260


def test_every_docs_page_the_readme_links_exists():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README))
    assert linked, "the README links no page of docs/"
    assert {path for path in linked if not (ROOT / path).is_file()} == set()


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=lambda path: path.name)
def test_run_script_header_is_at_most_15_lines(script):
    lines = script.read_text().splitlines()
    assert lines[0].startswith("#!")
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines[1:]))
    assert header and len(header) <= 15, f"{script.name}: {len(header)} header lines"


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=lambda path: path.name)
def test_run_script_holds_the_papers_hyperparameters_of_its_dataset(script):
    """Each script is at most 30 lines: its header, its block of editable values, one shared body;
    the values are the paper's for its dataset, as the dataset table records them."""
    text = script.read_text()
    assert len(text.splitlines()) <= 30 and text.rstrip().endswith(". scripts/run_study.sh")
    dataset = re.search(r"^DATASET=(\w+)$", text, re.M).group(1)
    values = dict(re.findall(r"^([A-Z_0-9]+)=\$\{\1:-([^}]*)\}$", text, re.M))
    paper = dataclasses.asdict(get_spec(dataset).paper)
    paper.pop("mlp_ratio"), paper.pop("expert_handover")  # the sweep's defaults; not in scripts
    assert {name.lower(): float(value) for name, value in values.items() if name != "SEEDS"} \
        == {name: float(value) for name, value in paper.items()}


@pytest.mark.slow
def test_quick_start_runs_on_the_synthetic_default(tmp_path):
    env = {**os.environ, "EPOCHS": "2", "STAGE_EPOCHS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["sh", "run_MoMKE_cmumosi.sh", "--hidden", "16", "--test-condition",
                           "atv", "--missing-rate", "0.5", "--data-root", str(tmp_path / "features"),
                           "--output-dir", str(tmp_path / "saved")], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTHETIC" in done.stderr + done.stdout
    assert (tmp_path / "features" / "synthetic" / "CMUMOSI" / "SYNTHETIC.json").is_file()
    assert len(list((tmp_path / "saved" / "CMUMOSI").glob("*/result.json"))) == 2
    table = (tmp_path / "saved" / "CMUMOSI" / "report" / "CMUMOSI.md").read_text()
    assert "| atv | 1 |" in table and "bootstrap interval over test conversations" in table
    # PRECISION=fp32 by default, and so recorded
    result = json.loads(next((tmp_path / "saved" / "CMUMOSI").glob("*/result.json")).read_text())
    assert result["config"]["amp"] is False and "Arithmetic: float32" in table


@pytest.mark.slow
def test_precision_bf16_runs_bfloat16_where_the_cpu_has_it_and_records_what_ran(tmp_path):
    env = {**os.environ, "EPOCHS": "2", "STAGE_EPOCHS": "1", "PRECISION": "bf16",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["sh", "run_MoMKE_cmumosi.sh", "--hidden", "16", "--test-condition",
                           "atv", "--missing-rate", "", "--no-ci", "--data-root",
                           str(tmp_path / "features"), "--output-dir", str(tmp_path / "saved")],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next((tmp_path / "saved" / "CMUMOSI").glob("*/result.json")).read_text())
    assert result["config"]["amp"] is cpu_has_bf16()


@pytest.mark.parametrize("variable", ["PRECISION=fp16", "COMPILE=maybe"])
def test_run_scripts_refuse_an_unknown_precision_or_compile_value(variable):
    name, value = variable.split("=")
    for script in RUN_SCRIPTS:
        done = subprocess.run(["sh", script.name], check=False, cwd=ROOT,
                              env={**os.environ, name: value}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and f"{name}={value}: use" in done.stderr, script.name
