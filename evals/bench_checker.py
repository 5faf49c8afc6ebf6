"""Time the answer checker: milliseconds per output over the hand-graded corpus and on pathological outputs.

    OMP_NUM_THREADS=1 python -m evals.bench_checker

Prints median / p95 / max ms per output over tests/data/eval_corpus.jsonl (two passes: the first with cold
caches, the second with math-verify's parse cache warm), then the seconds taken by a few long outputs (closed
``$...$`` sums of thousands of terms, a 500-deep brace nest, a 150k-character trace). math-verify's import
(~1.5 s) is done before timing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from evals import extract
from evals.scoring import verify

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_corpus.jsonl"


def _ms(rows) -> list[float]:
    out = []
    for r in rows:
        t = time.perf_counter()
        verify(r["kind"], r["output"], r["gold"], choices=r.get("choices"))
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    verify("math", "\\boxed{1}", "1")  # import math-verify / sympy once
    extract.parse_latex_answer.cache_clear()
    extract.parse_statement.cache_clear()
    for label in ("cold", "warm"):
        ms = sorted(_ms(rows))
        print(f"corpus ({len(rows)} outputs, {label} cache): median {statistics.median(ms):.1f} ms, "
              f"p95 {ms[int(0.95 * len(ms))]:.1f} ms, max {ms[-1]:.0f} ms, total {sum(ms) / 1000:.2f} s")
    long = {
        "closed $1+...+1$, 2,000 terms": "The answer is $" + "1+" * 2000 + "1$.",
        "closed $1+...+1$, 60,000 terms": "The answer is $" + "1+" * 60000 + "1$.",
        "unclosed $1+... (120k chars)": "The answer is $" + "1+" * 60000,
        "\\boxed{1+...} 60,000 terms": "\\boxed{" + "1+" * 60000 + "1}",
        "500-deep brace nest": "\\boxed{" + "{" * 500 + "5" + "}" * 500 + "}",
        "150k-char <think> then a box": "<think>" + "$1+" * 50000 + "</think>\\boxed{7}",
    }
    for label, out in long.items():
        t = time.perf_counter()
        v = verify("math", out, "7")
        print(f"{label}: {time.perf_counter() - t:.2f} s ({v.status})")


if __name__ == "__main__":
    main()
