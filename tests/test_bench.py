"""The benchmark command in this process (no timing is asserted: speed lives in
BENCHMARKS.md): arguments are checked, the data and save benchmarks run, the step
benchmark's JSON and profile. (Its table through a real process: e2e/test_bench_cli.py.)"""

import json

import pytest

from conftest import TINY
from pjit_llm import perf
from pjit_llm.bench import main as bench_main
from pjit_llm.errors import UserError
from pjit_llm.training.build import Components


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(UserError, match="--steps must be >= 1"):
        bench_main(["--steps", "0"])
    with pytest.raises(UserError, match="--repeats must be >= 1"):
        bench_main(["save", "--repeats", "0"])


def test_step_benchmark_json_and_profile(tmp_path, capsys):
    bench_main(["--steps", "1", "--warmup", "0", *TINY, "--json", "--profile",
                str(tmp_path / "trace")])
    out = capsys.readouterr()
    assert list((tmp_path / "trace" / "row0").rglob("*.xplane.pb"))  # the timed step, traced
    row = json.loads(out.out)  # JSON alone on stdout; the attention line went to stderr
    assert row["variant"] == "base" and row["tokens_per_step"] == 512
    assert "attention: XLA" in out.err
    # What made the row, for setting rows of several runs side by side (bench_report).
    assert row["config"] is None and row["overrides"] == TINY


def test_a_step_that_cannot_fit_is_refused_before_its_state_is_made(monkeypatch):
    """As training refuses it (the device's limit faked: a CPU states none)."""
    monkeypatch.setattr(perf, "device_memory_limit", lambda device: 1 << 20)

    def init_state(self, seed=None):
        raise AssertionError("the state was made before the step was refused")

    monkeypatch.setattr(Components, "init_state", init_state)
    with pytest.raises(UserError, match="needs .* per device but the device has 1 MiB; shard more"):
        bench_main(["--steps", "1", "--warmup", "0", *TINY])


def test_data_and_save_benchmarks_run(capsys, tmp_path):
    # data.data_dir is left at "": the built-in corpus goes to TFDS's default directory,
    # which conftest.py makes a temporary one.
    bench_main(["data", "--workers", "0", "--batches", "2", "--warmup", "1", "--repeats", "1",
                "--json", *TINY])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert rows[0]["workers"] == 0 and rows[0]["tokens_per_s"] > 0
    (tmp_path / "notes.txt").write_text("a line of notes\n" * 2000)
    bench_main(["data", "--workers", "0", "--batches", "2", "--warmup", "1", "--repeats", "1",
                "--json", *TINY, f"data.mixture=[{{source: builtin, weight: 2}}, "
                f"{{source: local, paths: [{tmp_path / 'notes.txt'}]}}]"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert rows[0]["source"] == "mixture of 2" and rows[0]["tokens_per_s"] > 0
    bench_main(["save", "--repeats", "1", "--dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "async" in out and "sync" in out


def test_generation_benchmark_prints_a_json_list(capsys):
    bench_main(["generate", "--batch", "1", "--batch", "2", "--repeats", "1", "--new-tokens", "3",
                "--prompt-len", "4", *TINY, "--variant", "mesh.tensor=2", "--json"])
    rows = json.loads(capsys.readouterr().out)  # JSON alone on stdout
    assert [(r["variant"], r["batch"]) for r in rows] == [
        ("base", 1), ("base", 2), ("mesh.tensor=2", 1), ("mesh.tensor=2", 2)]
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    with pytest.raises(UserError, match="--new-tokens >= 2"):
        bench_main(["generate", "--new-tokens", "1"])


def test_memory_benchmark_plans_each_mesh_without_running(capsys):
    bench_main(["memory", *TINY, "model.num_layers=1", "mesh.data=1", "--variant",
                "mesh.context=2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [r["mesh"] for r in rows] == ["1 device", "context=2"]
    assert rows[1]["load_balance"] and rows[1]["temporaries"] < rows[0]["temporaries"]
