"""hess.cli: --help everywhere, lazy dispatch to the module of each command, clear 'not available yet'
messages for commands whose module does not exist, user errors without tracebacks, and `hess sweep`
end to end on a stand-in objective."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import hess
from hess.cli import COMMANDS, Command, main

EXPECTED = {"calibrate", "evaluate", "sweep", "reproduce", "report", "train", "demo"}


def _exit_code(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_top_level_help_lists_every_command(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert EXPECTED <= set(COMMANDS.names()) and all(name in out for name in EXPECTED)
    assert _exit_code(["--version"]) == 0 and capsys.readouterr().out.strip() == f"hess {hess.__version__}"
    assert _exit_code([]) == 2  # a command is required


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_command_has_help(name, capsys):
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hess {name}") and COMMANDS.get(name).help in out


def test_reproduce_help_documents_questions_and_presets(capsys):
    _exit_code(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert "{rq1,rq2,rq3,rq4,rq5,latency,all}" in out and "--preset {demo,paper,micro}" in out


@pytest.fixture
def fake_command(monkeypatch, tmp_path):
    """Register a throw-away command whose provider module lives in tmp_path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def register(module_source, planned=None):
        name = f"fake_provider_{abs(hash(module_source)) % 10**8}"
        if module_source is not None:
            (tmp_path / f"{name}.py").write_text(module_source)
        module = name if module_source is not None else "hess._no_such_module_for_tests"
        monkeypatch.setitem(COMMANDS._items, "fake", Command("fake", "a test command", module, planned))
        return module

    return register


def test_missing_module_gives_clear_message_and_keeps_help(fake_command, capsys):
    def planned(parser):
        parser.add_argument("--level", type=int, default=1)

    fake_command(None, planned)
    assert main(["fake", "--level", "3"]) == 1
    assert capsys.readouterr().err.strip() == "hess fake: not available yet: needs hess._no_such_module_for_tests"
    assert _exit_code(["fake", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--level LEVEL" in out and "status: hess fake: not available yet" in out


def test_module_needing_a_missing_hess_module(fake_command, capsys):
    module = fake_command("import hess._missing_dependency_for_tests\n")
    assert main(["fake"]) == 1
    assert (f"needs hess._missing_dependency_for_tests (imported by {module})") in capsys.readouterr().err


def test_module_without_cli_functions(fake_command, capsys):
    module = fake_command("X = 1\n")
    assert main(["fake"]) == 1
    assert f"needs {module}.configure_cli / run_cli" in capsys.readouterr().err


def test_other_import_errors_are_not_hidden(fake_command):
    fake_command("import numpy_with_a_typo_for_tests\n")
    with pytest.raises(ModuleNotFoundError, match="numpy_with_a_typo_for_tests"):
        main(["fake"])


def test_provider_is_dispatched_and_user_errors_are_messages(fake_command, capsys):
    fake_command(
        "from hess.cli import add_config_arguments, config_from_args\n"
        "def configure_cli(parser):\n    add_config_arguments(parser)\n"
        "def run_cli(args):\n    cfg = config_from_args(args)\n    print(cfg.budget.keep_ratio)\n    return 7\n"
    )
    assert main(["fake", "budget.keep_ratio=0.125"]) == 7 and capsys.readouterr().out.strip() == "0.125"
    assert main(["fake", "budget.keep_ration=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hess fake: error: invalid config overrides") and "did you mean budget.keep_ratio" in err
    assert "Traceback" not in err



def test_overrides_may_follow_options(fake_command, capsys):
    """``KEY=VALUE`` after an option still counts (argparse alone stops collecting positionals there);
    anything else unrecognised is still the usual usage error."""
    fake_command(
        "from hess.cli import add_config_arguments, config_from_args\n"
        "def configure_cli(parser):\n    add_config_arguments(parser)\n"
        "def run_cli(args):\n    cfg = config_from_args(args)\n"
        "    print(cfg.budget.keep_ratio, cfg.score.lam, cfg.log.wandb_mode)\n    return 0\n"
    )
    assert main(["fake", "budget.keep_ratio=0.125", "--no-wandb", "score.lam=0.25", "budget.keep_ratio=0.5"]) == 0
    assert capsys.readouterr().out.split() == ["0.5", "0.25", "disabled"]  # later overrides win
    assert _exit_code(["fake", "score.lam=0.25", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err

def test_help_imports_no_command_module():
    code = ("import sys\nfrom hess.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('hess.sweep', 'optuna', 'torch', 'wandb', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_console_script():
    exe = shutil.which("hess")
    if exe is None:
        pytest.skip("the hess console script is not installed (pip install -e .)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"hess {hess.__version__}"


STAND_IN = '''
from hess.sweep import Float
SPACE = {"budget.keep_ratio": Float(0.05, 0.6)}
def evaluate(cfg):
    return {"synthetic/auc30": 1.0 - abs(cfg.budget.keep_ratio - 0.3)}
'''


def test_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    argv = ["sweep", "--name", "cli", "--space", f"{tmp_path}/stand_in.py:SPACE", "--objective",
            f"{tmp_path}/stand_in.py:evaluate", "--n-trials", "4", "--no-wandb", "--out", str(tmp_path / "out"),
            "--no-progress", "--sampler", "random", "--seed", "3"]
    assert main(argv) == 0
    assert "ran 4 trial(s); 4 finished in total" in capsys.readouterr().out
    folder = tmp_path / "out" / "sweeps" / "cli"
    trials = pd.read_csv(folder / "trials.csv")
    best = json.loads((folder / "best.json").read_text())
    assert len(trials) == 4 and best["synthetic/auc30"] == pytest.approx(trials["value_synthetic/auc30"].max())
    assert trials.loc[0, "params_budget.keep_ratio"] == 0.27  # the baseline ran first
    assert best["synthetic/auc30"] == pytest.approx(1 - abs(best["params"]["budget.keep_ratio"] - 0.3))
    assert (folder / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:-4] + ["--n-trials", "6"]) == 0  # resume: 2 more, not 6
    assert "ran 2 trial(s); 6 finished in total" in capsys.readouterr().out
