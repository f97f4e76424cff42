"""The report of gathered benchmark rows, from rows the real benchmark printed here: each row
beside its config's base with ratios, a failed command in its place, a training run's logged
speed as a row, and where a profiled step's time went."""

import json

import pytest

from conftest import TINY
from pjit_llm import bench_report
from pjit_llm.bench import main as bench_main
from pjit_llm.errors import UserError


def bench_rows(capsys, *args: str) -> list[dict]:
    bench_main([*args, "--json"])
    out = capsys.readouterr().out
    return [r for line in out.splitlines() if line.startswith(("{", "["))
            for r in (json.loads(line) if line.startswith("[") else [json.loads(line)])]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_of_several_runs_are_set_beside_their_base(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # not the tests' own flag: rows name the flags given
    rows = bench_rows(capsys, "step", "--steps", "1", "--warmup", "0", *TINY,
                      "--variant", "model.remat=full", "--profile", str(tmp_path / "trace"))
    rows += bench_rows(capsys, "step", "--steps", "1", "--warmup", "0", *TINY, "model.num_layers=1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    rows += bench_rows(capsys, "generate", "--batch", "1", "--repeats", "1", "--new-tokens", "3",
                       "--prompt-len", "4", *TINY)
    rows.append(bench_report.failed_row("step", "error: model.remat='x' is not one of: none",
                                        None, [*TINY, "model.remat=x"]))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')

    table, unreadable = bench_report.read_rows([tmp_path / "rows.jsonl"])
    assert table == rows and unreadable == 1
    lines = bench_report.report(table, unreadable)
    steps = {cells(x)[0]: cells(x) for x in lines if x.startswith("| ") and "GiB" in x}
    # Every row of this process shares TINY, so its rows differ from the base by the rest.
    base, remat, shallow = (steps[" ".join(TINY)], steps[" ".join(TINY) + " model.remat=full"],
                            steps[" ".join(TINY + ["model.num_layers=1"])])
    assert base[7] == "1.00x" and base[8] == "1.00x"
    by_label = {bench_report.label(r): r for r in rows}
    speedup = (bench_report.tokens_per_s(by_label[shallow[0]])
               / bench_report.tokens_per_s(by_label[base[0]]))
    assert shallow[7] == f"{speedup:.2f}x" and remat[1] == f"{by_label[remat[0]]['step_s']:.3f}"
    failed = next(x for x in lines if "failed:" in x)
    assert cells(failed)[0].endswith("model.remat=x") and "is not one of" in failed
    generation = [cells(x) for x in lines if "XLA_FLAGS='--xla_gpu_enable_command_buffer='" in x]
    assert [g[1] for g in generation] == ["1"] and generation[0][7] == "1.00x"  # its own base
    assert lines[-1] == "(1 line(s) that were not JSON rows left out.)"

    summary = bench_report.trace_summary(tmp_path / "trace", top=5)  # 8 devices: collectives
    kinds = [k for k, _ in bench_report.KINDS] + ["other (fusions)"]
    shares = [float(cells(x)[2].rstrip(" %")) for x in summary if cells(x)[0] in kinds]
    assert shares and sum(shares) == pytest.approx(100, abs=0.5)
    assert len([x for x in summary if x.startswith("| ")]) - len(shares) == 4 + 5  # 2 headers, 2 separators


def test_a_training_run_becomes_a_step_row(trained_run):
    records, _ = bench_report.read_rows([trained_run.directory / "metrics.jsonl"])
    logged = [r for r in records if "step_s" in r]
    row = bench_report.loop_row(records, after=2, config="configs/tiny.yaml")
    assert row["variant"] == f"training loop, steps 2-{logged[-1]['step']}"
    assert row["intervals"] == len([r for r in logged if r["step"] > 2]) >= 2
    assert min(r["step_s"] for r in logged) <= row["step_s"] <= max(r["step_s"] for r in logged)
    assert "| training loop, steps 2-" in "\n".join(bench_report.report([row]))
    with pytest.raises(UserError, match="no logged interval ends after step 99"):
        bench_report.loop_row(records, after=99)
