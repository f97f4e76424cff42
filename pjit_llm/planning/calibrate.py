"""Honest calibration: run the plan's first candidates for a few steps on the devices this
process has (the emulated CPU mesh, or a GPU node) and set the measured step times beside the
predicted ones."""

from pjit_llm.training.measure import measure


def measured_rows(rows: list[dict], count: int, steps: int, warmup: int, progress) -> list[dict]:
    """The first `count` fitting rows, each run `steps` timed steps after `warmup`."""
    chosen = [r for r in rows if r["fits"]][:count]
    out = []
    for i, r in enumerate(chosen):
        progress(i, len(chosen), f"running {r['candidate'].describe_mesh()} {r['candidate'].remat}")
        m = measure(r["config"], steps, warmup)
        out.append({"rank": i + 1, "candidate": r["candidate"],
                    "predicted": r["estimate"].step_s, "measured": m["step_s"]})
    progress(len(chosen), len(chosen), "measured")
    return out
