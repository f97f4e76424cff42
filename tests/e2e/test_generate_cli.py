"""The generation command on the session's trained run: one prompt streams, several prompts
print one after another, on another mesh."""

from conftest import run_module


def test_generate_cli_streams_text(trained_run):
    run = str(trained_run.directory)
    one = run_module("pjit_llm.generate", "--run", run, "--prompt", "import os",
                     "--max-new-tokens", "5", "--temperature", "0.8")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("import os")
    two = run_module("pjit_llm.generate", "--run", run, "--prompt", "a", "--prompt", "bb",
                     "--max-new-tokens", "4", "--emulate-devices", "4", "mesh.data=2",
                     "mesh.fsdp=1", "mesh.tensor=2")
    assert two.returncode == 0, two.stderr
    assert "=== a\n" in two.stdout and "=== bb\n" in two.stdout
