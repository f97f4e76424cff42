"""The one error type: a command turns it into one line on stderr and exit status 2."""

import dataclasses
import errno

import jax
import pytest

from pjit_llm.errors import UserError, first_line, out_of_space, require_positive, run_cli


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


def test_a_full_disk_is_recognised_from_python_and_from_tensorstore():
    # TensorStore's message as a save to a full tmpfs raised it (an errno noted in the text).
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/ckpt/39.orbax-checkpoint-tmp/state/'
        '_sharding": Failed writing: "/ckpt/39.orbax-checkpoint-tmp/state/_sharding": Failed to '
        "write 394481 bytes to file 11: No space left on device [os_error_code='28']")
    try:
        try:
            raise tensorstore
        except ValueError as e:
            raise RuntimeError("Save Finalize thread failed") from e
    except RuntimeError as wrapped:
        assert out_of_space(wrapped)
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device", "/run/metadata"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not out_of_space(OSError(errno.EIO, "Input/output error"))
    assert not out_of_space(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
