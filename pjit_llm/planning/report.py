"""What a plan shows and writes: the ranked table, the chosen config as YAML, and the
comparison of predicted with measured step times (with the Spearman rank correlation)."""

from pathlib import Path

import yaml

from pjit_llm.bench_tables import print_table
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.metrics import human_bytes


def print_plan(rows: list[dict], header: str) -> None:
    """`rows`: dicts of candidate, memory, estimate, tokens_per_s, mfu, fits."""
    print(header)
    print_table(["#", "mesh", "remat", "schedule", "loss chunk", "memory/device", "step s",
                 "tokens/s", "MFU", "dominant term"],
                [[str(i + 1) if r["fits"] else "-", r["candidate"].describe_mesh(),
                  r["candidate"].remat, r["candidate"].describe_schedule(),
                  str(r["candidate"].loss_chunk or "-"), human_bytes(r["memory"]) +
                  ("" if r["fits"] else " (over)"), f"{r['estimate'].step_s:.4g}",
                  f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                  f"{r['estimate'].dominant} {_share(r['estimate'])}"]
                 for i, r in enumerate(rows)])


def _share(est) -> str:
    return f"({100 * est.terms[est.dominant] / max(est.step_s, 1e-12):.0f}%)"


def write_plan(cfg: Config, path: str, comment: str) -> None:
    """The chosen config, complete, so that `python -m pjit_llm.train --config PATH` runs it."""
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    target = Path(path)
    try:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    except OSError as e:
        raise UserError(f"cannot write the plan to {path}: {e.strerror}") from None


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank)."""
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 1.0


def print_calibration(rows: list[dict]) -> dict:
    """Predicted against measured step times of the candidates run; returns the summary."""
    print_table(["#", "mesh", "remat", "schedule", "predicted s", "measured s", "ratio"],
                [[str(r["rank"]), r["candidate"].describe_mesh(), r["candidate"].remat,
                  r["candidate"].describe_schedule(), f"{r['predicted']:.4g}",
                  f"{r['measured']:.4g}", f"{r['measured'] / r['predicted']:.2f}"]
                 for r in rows])
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    fastest = min(r["measured"] for r in rows)
    top = rows[0]["measured"]
    print(f"Spearman rank correlation (predicted vs measured order): {rho:.2f}; the plan's "
          f"choice measures {top:.4g} s, {100 * (top / fastest - 1):.1f}% over the fastest "
          f"run ({fastest:.4g} s)")
    return {"spearman": rho, "choice_s": top, "fastest_s": fastest}
