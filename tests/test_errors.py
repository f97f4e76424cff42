"""The one error type: a command turns it into one line on stderr and exit status 2."""

import dataclasses

import pytest

from pjit_llm.errors import UserError, first_line, require_positive, run_cli


def test_a_user_error_exits_2_with_one_line(capsys):
    def main():
        raise UserError("model.num_layers=0 must be positive")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: model.num_layers=0 must be positive\n"
    run_cli(lambda: None)  # no error: returns


def test_first_line_of_a_library_exception():
    assert first_line(RuntimeError("short\nand a page of detail")) == "short"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10


def test_require_positive_names_the_field():
    @dataclasses.dataclass
    class Section:
        steps: int = 0
        lr: float = 0.1

    require_positive(Section(steps=1), "train", "steps", "lr")
    with pytest.raises(UserError, match=r"^train.steps=0 must be positive$"):
        require_positive(Section(), "train", "lr", "steps")
