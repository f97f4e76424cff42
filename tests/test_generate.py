"""The generation command's arguments, checked before anything is loaded."""

import pytest

from pjit_llm.errors import UserError
from pjit_llm.generate import main


def test_a_prompt_is_required(tmp_path):
    with pytest.raises(UserError, match="give a --prompt"):
        main(["--run", str(tmp_path)])


@pytest.mark.parametrize("option", [["--max-new-tokens", "0"], ["--top-p", "0"],
                                    ["--temperature", "-1"]])
def test_sampling_settings_are_checked(tmp_path, option):
    with pytest.raises(UserError, match="need --max-new-tokens >= 1"):
        main(["--run", str(tmp_path), "--prompt", "a", *option])
