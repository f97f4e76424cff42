"""The metrics log: JSONL records, a progress bar on a terminal and plain lines otherwise."""

import io
import json

from pjit_llm.metrics import MetricsLog, format_record, human_bytes, human_count


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    record = {"step": 5, "loss": 2.5, "tokens_per_s": 1000.0}
    plain = MetricsLog(tmp_path, total_steps=10)
    plain.write(record)
    plain.close()
    assert "step 5 | loss 2.5" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdout", Terminal())
    bar = MetricsLog(tmp_path, append=True, total_steps=10)
    bar.write(record)
    assert bar._bar.n == 5 and "loss=2.5" in str(bar._bar)
    bar.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 5]


def test_numbers_are_printed_short():
    assert format_record({"step": 3, "loss": 2.345678, "tokens_per_s": 123456.7}) == \
        "step 3 | loss 2.346 | tokens_per_s 123,457"
    assert human_count(1_234_567) == "1.23M" and human_bytes(3 * 2**30) == "3 GiB"
