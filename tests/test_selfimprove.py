"""The self-improvement study (python -m iwsft.selfimprove): task, teacher, placebo loss, statistics, a smoke run.

Oracles: Python's integer addition for the teacher's answers, hand-computed Student-t intervals, brute force over
permutations for the placebo loss, and re-running the study to check that finished steps are skipped.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import iwsft
from iwsft import selfimprove as si


def test_noiseless_teacher_is_always_right_with_both_strategies(monkeypatch):
    for name in ("FORGET_CARRY", "SPLIT_SLIP", "SLIP"):
        monkeypatch.setattr(si, name, 0.0)
    rng, seen = random.Random(0), set()
    for _ in range(2000):
        p = si.problem(rng)
        s = si.teacher_solution(p, rng)
        assert s["correct"] and s["attempt"] == f"Answer: {p['a'] + p['b']}"
        assert si.strategy_of("<|im_start|>think\n" + s["thinking"]) == s["strategy"]
        seen.add(s["strategy"])
    assert seen == {"ones", "split"}


def test_noisy_teacher_prefers_the_worse_strategy():
    rng = random.Random(1)
    by = {"ones": [], "split": []}
    for _ in range(6000):
        p = si.problem(rng)
        s = si.teacher_solution(p, rng)
        by[s["strategy"]].append(s["correct"])
        from evals.scoring import score_aime  # the study's checker agrees with the teacher's own bookkeeping
        if len(by["ones"]) < 50:
            assert score_aime("<|im_start|>answer\n" + s["attempt"], p["answer"]).correct == s["correct"]
    share_ones = len(by["ones"]) / 6000
    acc = {k: sum(v) / len(v) for k, v in by.items()}
    assert abs(share_ones - si.P_ONES) < 0.03
    # no slip in either step and the carry kept: (1 - SLIP)^2 (1 - P(carry) FORGET_CARRY), P(carry) = 45/100
    assert acc["ones"] == pytest.approx((1 - si.SLIP) ** 2 * (1 - 0.45 * si.FORGET_CARRY), abs=0.04)
    assert acc["split"] == pytest.approx((1 - si.SLIP) * (1 - si.SPLIT_SLIP), abs=0.04)
    assert acc["ones"] < acc["split"] - 0.1


def test_prompt_files_are_disjoint(tmp_path):
    held = si.write_prompts(tmp_path / "h.jsonl", 50, seed=1)
    train = si.write_prompts(tmp_path / "t.jsonl", 300, seed=2, exclude=[r["question"] for r in held])
    assert not {r["question"] for r in held} & {r["question"] for r in train}
    assert len({r["question"] for r in train}) == 300
    assert all(int(r["answer"]) == sum(int(x) for x in r["question"][8:-1].split(" + ")) for r in train)


def test_t_interval_by_hand():
    m, lo, hi = si.t_interval([1.0, 2.0, 3.0])
    h = 4.302652729911275 / 3 ** 0.5  # t_{0.975, 2} · sd / sqrt(n), sd = 1
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - h, 2.0 + h))


def test_placebo_loss_permutes_the_weights_within_the_batch():
    logp = -torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.25, 4.0]])  # [B=3, T=2]
    mask = torch.ones(3, 2, dtype=torch.bool)
    w = torch.tensor([1.0, 2.0, 5.0])
    placebo = si.ShuffledChunkedWeightedNLL(num_output_chunks=1)
    allowed = {round(float(iwsft.weighted_nll(logp, mask, seq_weights=w[list(p)])[0]), 5)
               for p in itertools.permutations(range(3))}
    got = {round(float(placebo(logp, mask, seq_weights=w)[0]), 5) for _ in range(12)}
    assert got <= allowed and len(got) > 1  # always some permutation, not always the same one
    assert placebo(logp, mask)[0] == iwsft.weighted_nll(logp, mask)[0]  # no weights (SFT): unchanged


def test_help_states_the_sizes_and_times_of_each_configuration(capsys):
    with pytest.raises(SystemExit):
        si.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    # the configurations as README.md and docs/selfcurate.md describe them, with what was measured
    assert "full 5 seeds x 2 rounds" in out and "128 training prompts x k=8 samples" in out and "9.1 min" in out
    assert "150 held-out prompts (greedy + 2 sampled answers each)" in out
    assert "large 5 seeds x 2 rounds" in out and "256 training prompts x k=8" in out and "not run yet" in out
    assert "default: runs/selfimprove" in out and "number of paired seeds" in out


@pytest.mark.slow
def test_smoke_study_writes_the_report_and_resumes(tmp_path):
    sc = si.StudyConfig(seeds=2, rounds=1, methods=("sft", "placebo"), train_prompts=12, eval_prompts=8, k=3,
                        eval_samples=1, epochs=1, batch_size=4, label="smoke")
    table = si.study(tmp_path / "s", sc, jobs=2)
    out = tmp_path / "s"
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["seed"], r["round"], r["method"]) for r in rows} == {
        (s, r, m) for s in (0, 1) for r in (0, 1) for m in ("sft", "placebo")}
    r1 = [r for r in rows if r["round"] == 1]
    assert all(0 <= r["greedy_acc"] <= 1 and r["curated"]["correct_samples"] > 0 for r in r1)
    plc = [r for r in r1 if r["method"] == "placebo"]
    # step 1 trains from p_ref on its own samples with the exact recorded log p_ref: log-ratio 0
    assert all(abs(r["weights"]["log_ratio_mean"]) < 0.05 for r in plc)
    assert "smoke configuration" in table and "placebo" in table
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "weights.png").stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("DONE.json")}
    si.study(out, sc, jobs=1)  # everything is done: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("DONE.json")} == before


@pytest.mark.parametrize("args, needle", [
    (["--seeds", "0"], "--seeds 0: must be an integer >= 1"),
    (["--seeds", "-2"], "--seeds -2: must be an integer >= 1"),
    (["--rounds", "-1"], "--rounds -1: must be an integer >= 1"),
    (["--jobs", "0"], "--jobs 0: must be an integer >= 1"),
    (["--only-seeds", "a,b"], "--only-seeds 'a,b': expected comma-separated seed numbers"),
    (["--config", "smoke", "--only-seeds", "7"], "seeds must lie in 0..1 (--seeds 2)"),
    (["--pref", "/nonexistent/model"], "--pref /nonexistent/model: not a model directory"),
])
def test_bad_study_options_are_refused_in_one_line_before_any_work(tmp_path, capsys, args, needle):
    out = tmp_path / "s"
    assert si.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_out_that_is_a_file_and_report_only_without_a_study_are_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert si.main(["--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert si.main(["--out", str(empty), "--report-only"]) == 2
    assert "holds no study" in capsys.readouterr().err and not any(empty.iterdir())  # nothing written


def test_report_only_uses_the_studys_own_settings(tmp_path, capsys, monkeypatch):
    """--report-only reads study.json: the table names the smoke configuration even without --config, and a
    contradicting --config is refused with the differing keys."""
    out = tmp_path / "s"
    out.mkdir()
    sc = si.StudyConfig.smoke()
    cfg = {**si.asdict(sc), "methods": list(sc.methods)}
    (out / "study.json").write_text(json.dumps(cfg))
    assert si.main(["--out", str(out), "--report-only"]) == 2  # no finished step yet
    assert "no finished step" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(si, "collect", lambda o, c: seen.setdefault("sc", c) and [] or [{"seed": 0}])
    monkeypatch.setattr(si, "report", lambda o, rows, c, secs, v: f"table of {c.label}")
    monkeypatch.setattr(si, "_versions", lambda: {})
    assert si.main(["--out", str(out), "--report-only"]) == 0
    assert seen["sc"].label == "smoke" and seen["sc"].train_prompts == 16 and "table of smoke" in capsys.readouterr().out
    assert si.main(["--out", str(out), "--report-only", "--config", "full"]) == 2
    err = capsys.readouterr().err
    assert "train_prompts: 16 (study) vs 128 (asked)" in err and "drop --config" in err


def test_a_resumed_study_with_other_settings_names_the_differing_keys(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    sc = si.StudyConfig.smoke()
    (out / "study.json").write_text(json.dumps({**si.asdict(sc), "methods": list(sc.methods)}))
    with pytest.raises(ValueError, match=r"label: 'smoke' -> 'full'.*--config smoke"):
        si.study(out, si.StudyConfig.full(), jobs=1)
