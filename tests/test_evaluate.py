"""The evaluation command's refusals that need no trained run. (The command on a trained run:
e2e/test_evaluate_cli.py.)"""

import pytest

from pjit_llm.errors import UserError
from pjit_llm.evaluate import main


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        main(["--run", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="--batches must be at least 1"):
        main(["--run", str(tmp_path), "--batches", "0"])
