"""Every command is also a console script (pyproject.toml), and each script is the command's
own entry point: one-line errors, exit status 2."""

import importlib.metadata
import sys

import pytest

COMMANDS = {"pjit-train": "pjit_llm.train", "pjit-evaluate": "pjit_llm.evaluate",
            "pjit-generate": "pjit_llm.generate", "pjit-export": "pjit_llm.export",
            "pjit-convert": "pjit_llm.convert", "pjit-bench": "pjit_llm.bench",
            "pjit-launch": "pjit_llm.launch", "pjit-plan": "pjit_llm.plan",
            "pjit-tokenizer": "pjit_llm.train_tokenizer"}


def _scripts() -> dict:
    return {ep.name: ep for ep in importlib.metadata.distribution("pjit_llm").entry_points
            if ep.group == "console_scripts"}


def test_every_command_has_a_console_script():
    scripts = _scripts()
    assert set(scripts) == set(COMMANDS)
    for name, module in COMMANDS.items():
        assert scripts[name].value == f"{module}:cli"


@pytest.mark.parametrize("name", ["pjit-train", "pjit-evaluate", "pjit-export"])
def test_a_script_refuses_bad_input_in_one_line(name, capsys, monkeypatch):
    monkeypatch.setenv("PJIT_LLM_XLA_DEFAULTS", "0")  # leave this process's XLA_FLAGS alone
    args = ["no.such_key=1"] if name == "pjit-train" else ["--run", "/nonexistent/run"]
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exit_:
        _scripts()[name].load()()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
