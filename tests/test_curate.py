"""python -m iwsft.curate and reference.strategy: dataset.

Oracles: hand-computed pass@k and a brute-force count over subsets; log-probs recomputed by a plain forward of the
HF model (no KV cache, no padding) at the sampling temperature; the recipe's own ``precomputed`` reference (one
forward of torchtune's model) against the recorded sampling log-probs.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iwsft import curate
from iwsft.selfimprove import ASSET_DIR

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ no model needed
def test_pass_at_k_matches_brute_force_over_subsets():
    for n, c in [(4, 0), (4, 1), (5, 2), (6, 6), (8, 3)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expect = sum(any(s) for s in subsets) / len(subsets)
            assert curate.pass_at_k(n, c, k) == pytest.approx(expect)
    assert curate.pass_at_k(8, 2, 1) == pytest.approx(2 / 8)


def test_verify_counts_bad_outputs_and_verifiers_never_as_correct():
    calls = []

    def boom(output, answer):
        calls.append(output)
        raise RuntimeError("checker crashed")

    assert curate.verify(boom, "   ", "7").reward == 0 and not calls  # empty: never reaches the verifier
    chk = curate.verify(boom, "Answer: 7", "7")
    assert chk.reward == 0 and "checker crashed" in chk.error
    assert curate.verify(lambda o, a: "yes", "x", "7").error.startswith("TypeError")  # unusable return value
    assert curate.verify(lambda o, a: 1.5, "x", "7").reward == 0
    assert curate.verify(lambda o, a: True, "x", "7").reward == 1
    assert curate.verify(lambda o, a: 0.25, "x", "7").reward == 0.25
    math_v = curate.resolve_verifier("math")
    from evals import scoring

    assert math_v is scoring.score_math
    assert curate.verify(math_v, "<|im_start|>answer\nAnswer: \\boxed{0.5}", "\\frac{1}{2}").reward == 1
    assert curate.verify(curate.resolve_verifier("aime"), "Answer: 033", "33").reward == 1
    with pytest.raises(ValueError, match="module:function"):
        curate.resolve_verifier("nonsense")
    with pytest.raises(ValueError, match="verifier='no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"):
        curate.resolve_verifier("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="module 'os' has no 'no_such_fn'"):
        curate.resolve_verifier("os:no_such_fn")
    with pytest.raises(ValueError, match="os.sep is a str, not a function"):
        curate.resolve_verifier("os:sep")


def test_load_prompts_reports_missing_answers_and_bad_columns(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"q": "one", "a": "1"}, {"q": "two", "a": None}, {"q": "three", "a": ""}, {"q": "four", "a": 4.0}]))
    ps = curate.load_prompts(f, question_column="q", answer_column="a")
    assert [p.answer for p in ps] == ["1", None, None, "4"]
    with pytest.raises(KeyError, match="'answer'"):
        curate.load_prompts(f, question_column="q")
    with pytest.raises(ValueError, match="greedy"):
        curate.SamplingConfig(temperature=0.0)
    # the Python API names its own argument (the CLI names the flag: see the CLI test)
    with pytest.raises(ValueError, match=r"^top_p=2.0: must be in \(0, 1\]"):
        curate.SamplingConfig(top_p=2.0)
    with pytest.raises(ValueError, match="^limit=0: must be an integer >= 1"):
        curate.load_prompts(f, question_column="q", answer_column="a", limit=0)
    # some answers missing: loaded and counted; every answer missing: refused, naming the column and the fix
    assert len(curate.load_prompts(f, question_column="q", answer_column="a", limit=2)) == 2
    g = tmp_path / "none.jsonl"
    g.write_text("\n".join(f.read_text().splitlines()[1:]))  # rows "two" (null) and "three" (""), then "four"
    with pytest.raises(ValueError, match=r"all 2 rows read \(--limit\) lack an answer in column 'a'.*--answer-col"):
        curate.load_prompts(g, question_column="q", answer_column="a", limit=2)
    with pytest.raises(ValueError, match="nothing to sample"):  # the API refuses too, before writing anything
        curate.curate(tmp_path, [curate.Prompt(0, "0", "two", None)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partial_groups_from_a_killed_run_are_discarded(tmp_path):
    f = tmp_path / "s.jsonl"
    rows = [{"prompt_id": p, "sample_index": j} for p in ("a", "b") for j in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt_id": "c", "sample_index": 0}) + "\n"
    f.write_text(text + '{"prompt_id": "c", "sam')  # killed in the middle of prompt c's group
    kept, discarded = curate._read_complete_groups(f, 3)
    assert [(r["prompt_id"], r["sample_index"]) for r in kept] == [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert discarded == 2


def test_settings_diff_lists_only_the_changed_keys():
    old = {"model": "/a", "model_fingerprint": "f", "verifier": "math",
           "sampling": {"k": 4, "temperature": 1.0, "seed": 0}}
    new = {"model": "/b", "model_fingerprint": "f", "verifier": "aime",
           "sampling": {"k": 2, "temperature": 1.0, "seed": 0}}
    assert curate.settings_diff(old, new) == ["verifier: 'math' → 'aime'", "k: 4 → 2"]
    assert curate.settings_diff(old, old) == []


def test_cli_user_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"question": "a?", "answer": ""}) + "\n" + json.dumps({"question": "b?"}) + "\n")
    cases = [
        (["--model", str(tmp_path), "--prompts", str(empty)], ["--prompts", "empty"]),
        (["--model", str(tmp_path), "--prompts", str(tmp_path / "nope.jsonl")], ["--prompts", "does not exist"]),
        (["--model", str(tmp_path / "no_model"), "--prompts", str(good)], ["--model", "does not exist"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--answer-column", "gold"], ["'gold'", "--answer-column"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--temperature", "0"], ["--temperature 0.0:", "greedy"]),
        # zero prompts to sample: an error, not "0 samples ... accuracy nan" with exit 0
        (["--model", str(tmp_path), "--prompts", str(no_answer)],
         ["all 2 rows lack an answer in column 'answer'", "--answer-column"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--limit", "0"], ["--limit 0:", ">= 1"]),
        # the flag as typed on the command line, its value and the fix
        (["--model", str(tmp_path), "--prompts", str(good), "-k", "0"], ["-k/--k 0:", ">= 1"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--top-p", "2"], ["--top-p 2.0:", "(0, 1]"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--batch-prompts", "0"], ["--batch-prompts 0:"]),
        (["--model", str(tmp_path), "--prompts", str(good), "--verifier", "nosuchmod:check"],
         ["--verifier 'nosuchmod:check': cannot import module 'nosuchmod'", "use math, aime, gpqa or an importable"]),
    ]
    for args, words in cases:
        assert curate.main(args + ["--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, err
        err = err.splitlines()[-1]  # (datasets may print a progress bar before it)
        assert err.startswith("error: ") and all(w in err for w in words) and "dataset.source" not in err, (words, err)
    assert not (tmp_path / "o" / "samples.jsonl").exists()


def test_help_gives_every_option_a_text_with_its_default(capsys):
    with pytest.raises(SystemExit):
        curate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())  # the option list (argparse wraps lines)
    for flags, default in [
            ("--question-column QUESTION_COLUMN", "question"), ("--answer-column ANSWER_COLUMN", "answer"),
            ("--split SPLIT", "train"), ("-k K, --k K", "8"), ("--temperature TEMPERATURE", "1.0"),
            ("--top-p TOP_P", "1.0"), ("--max-new-tokens MAX_NEW_TOKENS", "256"),
            ("--batch-prompts BATCH_PROMPTS", "8"), ("--seed SEED", "0"), ("--verifier VERIFIER", "math"),
            ("--device DEVICE", "cpu"),
            ("--backend {auto,transformers,vllm}", "auto")]:
        rest = text[text.index(flags) + len(flags):]  # the first default after the flag is its own
        assert re.search(r"\(default: ([^)]*)\)", rest).group(1) == default, (flags, rest[:200])
    for act in curate.build_parser()._actions:  # and no option (present or future) without help and default
        if act.dest != "help":
            assert act.help and ("default" in act.help or act.required), act.option_strings


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from iwsft.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("curate") / "tiny")


VERIFIER = textwrap.dedent('''
    def check(output, answer):
        if answer == "boom":
            raise ValueError("cannot check this one")
        return len(output) % 2 == 0
''')


def test_curate_end_to_end_logprobs_resume_and_bad_input(tiny, tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": None},
        {"question": "What is 7 - 1?", "answer": "boom"}, {"question": "What is 6 * 2?", "answer": "12"},
        {"question": "What is 9 + 9?", "answer": "18"}]))
    cfg = curate.SamplingConfig(k=3, temperature=0.7, max_new_tokens=6, batch_prompts=2, seed=3)
    out = tmp_path / "cur"
    ps = curate.load_prompts(prompts)
    s = curate.curate(tiny["model_dir"], ps, out, cfg, verifier="my_verifier:check", progress=False)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert s["prompts_without_answer"] == 1 and s["prompt_ids_without_answer"] == ["1"]
    assert len(rows) == 4 * 3 and s["samples"] == 12
    assert s["verifier_errors"] == 3 and all(r["reward"] == 0 for r in rows if r["prompt_id"] == "2")
    assert s["accuracy"] == pytest.approx(sum(len(r["messages"][-1]["content"]) % 2 == 0
                                              for r in rows if r["prompt_id"] != "2") / 12)
    for r in rows:
        assert len(r["response_token_ids"]) == len(r["response_logprobs"]) <= 6
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][1]["role"] == "user"
    # independent oracle: a plain forward (no cache, no padding) at temperature 0.7 gives the recorded log-probs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model_dir"], dtype=torch.float32).eval()
    for r in rows[:6]:
        ids = torch.tensor([r["prompt_token_ids"] + r["response_token_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(r["prompt_token_ids"]) - 1:-1]
        expect = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(r["response_token_ids"])[:, None])
        assert torch.allclose(expect.squeeze(1), torch.tensor(r["response_logprobs"]), atol=1e-5)
    # resume: a run killed in the middle of the last group continues there; nothing is duplicated
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:7]) + lines[7][:20])
    s2 = curate.curate(tiny["model_dir"], ps, out, cfg, verifier="my_verifier:check", progress=False)
    rows2 = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert s2["discarded_partial_rows"] == 2 and s2["new_samples"] == 6 and s2["resumed_rows"] == 6
    assert sorted(r["uid"] for r in rows2) == sorted(r["uid"] for r in rows)
    assert rows2[:6] == rows[:6]
    with pytest.raises(ValueError, match="other settings"):
        curate.curate(tiny["model_dir"], ps, out, curate.SamplingConfig(k=3, temperature=1.0, max_new_tokens=6),
                      verifier="my_verifier:check", progress=False)


def test_broken_verifier_keeps_no_rows_and_a_fixed_rerun_samples_them(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky_verifier.py").write_text(textwrap.dedent('''
        BROKEN = True
        def check(output, answer):
            if BROKEN:
                raise ImportError("checker dependency missing")
            return True
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                                 for i in range(3)))
    out = tmp_path / "o"
    args = ["--model", tiny["model_dir"], "--prompts", str(prompts), "--out", str(out), "-k", "2",
            "--max-new-tokens", "3", "--batch-prompts", "2", "--verifier", "flaky_verifier:check",
            "--backend", "transformers"]
    assert curate.main(args) == 2
    err = capsys.readouterr().err
    assert "raised on every sample of the first batch" in err and "rerun the same command" in err
    assert "checker dependency missing" in err and "Traceback" not in err
    assert "sampling" in err and re.search(r"^error: the verifier", err, re.M), err  # not glued to the bar
    assert (out / "samples.jsonl").read_text() == ""  # the failed batch left no reward-0 rows behind
    import flaky_verifier

    monkeypatch.setattr(flaky_verifier, "BROKEN", False)  # the user fixes the verifier and reruns
    assert curate.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_rows"] == 0 and s["new_samples"] == 6 and s["verifier_errors"] == 0
    assert s["correct_samples"] == sum(1 for x in (out / "samples.jsonl").read_text().splitlines()
                                       if json.loads(x)["messages"][-1]["content"].strip())
    # a changed setting: only the changed key and the fix are named
    assert curate.main([a if a != "2" else "3" for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "k: 2 → 3" in err and "--overwrite" in err and "temperature" not in err, err


def test_cli_runs_and_reports(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"problem": "What is 1 + 1?", "gold": 2}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "iwsft.curate", "--model", tiny["model_dir"], "--prompts",
                           str(prompts), "--out", str(tmp_path / "o"), "-k", "2", "--max-new-tokens", "4",
                           "--question-column", "problem", "--answer-column", "gold", "--verifier", "aime",
                           "--backend", "transformers"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "samples/s" in proc.stdout and "pass@2" in proc.stdout
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["samples"] == 2


# ------------------------------------------------------------------------------------------------ the recipe
def _tokenizer(model_dir):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(path=f"{model_dir}/vocab.json", merges_file=f"{model_dir}/merges.txt",
                             special_tokens_path=f"{model_dir}/tokenizer.json", max_seq_len=512)


@pytest.fixture(scope="module")
def pref_samples(tmp_path_factory):
    """Temperature-1 samples of the shipped tiny p_ref (it answers in the s1 format, so samples re-tokenize)."""
    from iwsft.selfimprove import write_prompts

    d = tmp_path_factory.mktemp("pref_samples")
    write_prompts(d / "p.jsonl", 12, seed=3)
    cfg = curate.SamplingConfig(k=2, temperature=1.0, max_new_tokens=48, batch_prompts=12, seed=0)
    curate.curate(ASSET_DIR, curate.load_prompts(d / "p.jsonl"), d / "cur", cfg, verifier="aime", progress=False)
    return d / "cur" / "samples.jsonl"


def test_dataset_refuses_a_row_whose_tokenization_differs(pref_samples, tmp_path):
    from iwsft.tune.datasets import curated_dataset

    tok = _tokenizer(ASSET_DIR)
    rows = [json.loads(x) for x in pref_samples.read_text().splitlines()]
    rows = [r for r in rows if r["finish_reason"] == "stop" and r["roundtrip"]][:4]
    assert len(rows) == 4
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = curated_dataset(tok, str(good), min_reward=None)
    ref = ds.reference_log_probs()
    assert len(ref) == 4 and torch.allclose(ref._data[2], torch.tensor(rows[2]["response_logprobs"]))
    bad = [dict(r) for r in rows]
    bad[2]["response_token_ids"] = list(bad[2]["response_token_ids"])
    bad[2]["response_token_ids"][5] = (bad[2]["response_token_ids"][5] + 1) % 400
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in bad))
    pos = len(bad[2]["prompt_token_ids"]) + 5
    with pytest.raises(ValueError, match=rf"row 2: .* at position {pos} \(response token 5\)"):
        curated_dataset(tok, str(f), min_reward=None)
    ds = curated_dataset(tok, str(f), min_reward=None, on_mismatch="skip")
    assert ds.num_mismatched == 1 and sorted(ds.sample_ids.tolist()) == [0, 1, 3]
    counts = ds.drop_counts()  # run_summary.json's dataset_rows: every source row accounted for
    assert (counts["source_rows"], counts["kept"], counts["mismatched"], counts["filtered"]) == (4, 3, 1, 0)
    for j, r in enumerate(bad):  # row 0 fails the verifier: filtered by min_reward before the id check
        r["reward"] = float(j != 0)
    f.write_text("".join(json.dumps(r) + "\n" for r in bad))
    counts = curated_dataset(tok, str(f), min_reward=1.0, on_mismatch="skip").drop_counts()
    assert (counts["source_rows"], counts["kept"], counts["mismatched"], counts["filtered"]) == (4, 2, 1, 1)


def test_recipe_refusing_a_mismatched_row_says_so_in_run_summary(pref_samples, tmp_path):
    """A refusal at data load: the run summary names the error and says no optimizer step was taken."""
    from test_recipe import run_env

    rows = [json.loads(x) for x in pref_samples.read_text().splitlines()][:4]
    rows[1]["response_token_ids"] = [t + 1 for t in rows[1]["response_token_ids"]]
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(REPO / "recipes" / "iwsft_distributed.py"), "--config",
           str(REPO / "configs" / "selfcurate_tiny.yaml"), f"checkpoint_dir={ASSET_DIR}", f"dataset.data_files={f}",
           f"output_dir={tmp_path / 'run'}", "dataset.min_reward=null"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode != 0 and "row 1: the recipe's tokenization differs" in proc.stderr, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert s["status"].startswith("stopped: error ValueError") and s["status"].endswith(
        "before the first optimizer step"), s["status"]
    assert s["stop"]["steps_done"] == 0


SPY = textwrap.dedent('''
    """Runs the recipe with the study's placebo loss wrapped by a spy that records every call of its forward."""
    import atexit, json, runpy, sys

    import iwsft.selfimprove as si

    out, recipe, calls, make = sys.argv[1], sys.argv[2], [], si._shuffled_loss_class

    def spied():
        shuffled = make()

        class Spy(shuffled):
            def forward(self, token_logp, mask, seq_weights=None, token_weights=None, **kw):
                loss = super().forward(token_logp, mask, seq_weights=seq_weights, token_weights=token_weights, **kw)
                calls.append({"fused": self.fused, "n_weights": 0 if seq_weights is None else seq_weights.numel(),
                              "shuffles": type(self)._calls})  # permutations drawn so far
                return loss
        return Spy

    si._shuffled_loss_class = spied
    atexit.register(lambda: open(out, "w").write(json.dumps(calls)))
    sys.argv = sys.argv[2:]
    runpy.run_path(recipe, run_name="__main__")
''')


@pytest.mark.parametrize("fused", ["true", "false"])
def test_placebo_weights_are_shuffled_on_the_recipes_loss_path(pref_samples, tmp_path, fused):
    """The placebo permutes the weights inside its loss's forward: the recipe must call ``self._loss_fn(...)`` with
    the sequence weights on the fused (``loss.fused: true``) and the chunked path alike, or the placebo would
    silently be iw-SFT. Oracle: a spy on the placebo's forward counts the calls and the permutations drawn."""
    from test_recipe import run_env

    from iwsft.selfimprove import METHODS

    (tmp_path / "spy.py").write_text(SPY)
    cmd = [sys.executable, str(tmp_path / "spy.py"), str(tmp_path / "calls.json"),
           str(REPO / "recipes" / "iwsft_distributed.py"), "--config", str(REPO / "configs" / "selfcurate_tiny.yaml"),
           f"checkpoint_dir={ASSET_DIR}", f"dataset.data_files={pref_samples}", f"output_dir={tmp_path / 'run'}",
           "dataset.min_reward=null", "dataset.on_mismatch=skip", "epochs=1", "max_steps_per_epoch=2",
           "batch_size=4", "gradient_accumulation_steps=1", f"loss.fused={fused}", *METHODS["placebo"]]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert len(calls) == 2 and all(c["fused"] == (fused == "true") for c in calls), calls
    assert [c["n_weights"] for c in calls] == [4, 4] and [c["shuffles"] for c in calls] == [1, 2], calls


@pytest.mark.slow
def test_dataset_reference_gives_the_weights_of_precomputed(pref_samples, tmp_path):
    """Temperature 1: the recorded sampling log-probs are log p_ref, so weights match the precomputed pass."""
    from test_recipe import read_metrics, run_env

    def run(strategy, out):
        cmd = [sys.executable, str(REPO / "recipes" / "iwsft_distributed.py"), "--config",
               str(REPO / "configs" / "selfcurate_tiny.yaml"), f"checkpoint_dir={ASSET_DIR}",
               f"dataset.data_files={pref_samples}", f"output_dir={out}", f"reference.strategy={strategy}",
               "dataset.min_reward=null", "epochs=1", "max_steps_per_epoch=3", "batch_size=4", "optimizer.lr=3e-3"]
        proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return read_metrics(out)

    ds_log, pc_log = run("dataset", tmp_path / "ds"), run("precomputed", tmp_path / "pc")
    assert len(ds_log) == len(pc_log) == 3
    for a, b in zip(ds_log, pc_log):
        for k in ("weight_mean", "weight_min", "weight_max", "log_ratio_mean", "loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert abs(ds_log[-1]["log_ratio_mean"]) > 1e-3  # the model moved: the weights are not trivially 1
    # and per sample: the recipe's precomputed cache equals the recorded log-probs
    from iwsft.tune.datasets import curated_dataset

    cache = torch.load(tmp_path / "pc" / "reference_logprobs.pt", weights_only=True)
    ds = curated_dataset(_tokenizer(ASSET_DIR), str(pref_samples), min_reward=None, on_mismatch="skip")
    ref = ds.reference_log_probs()
    offs = cache["offsets"].tolist()
    for j, sid in enumerate(cache["ids"].tolist()):
        assert torch.allclose(cache["values"][offs[j]:offs[j + 1]], ref._data[sid], atol=1e-5)
