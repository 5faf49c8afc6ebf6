"""End-to-end checks of the shipped lm-eval tasks and the runner (CPU, offline).

- oracle / nonsense / wrong fake models (registered lm-eval models) through the tasks and the runner's lm-eval
  plumbing: the oracle, which reads the gold answers straight from the data files, scores 100%; nonsense scores 0%
  with every output counted unparseable; confidently wrong answers score 0% with none unparseable;
- every task on a tiny random Qwen2 HF model (``iwsft.tiny``) through ``python -m evals.run`` (greedy, sampling,
  compare) and through the stock ``lm-eval run --include_path evals/`` CLI.

AIME/MATH500 data: ``../shared/data`` beside the repository (required: the tests fail if it is missing).
GPQA: a synthetic file in the gated dataset's column layout, written here (never the real questions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_FILES = {"aime24": "aime_2024.jsonl", "aime25": "aime_2025.jsonl", "math500": "math500.jsonl"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    missing = [f for f in DATA_FILES.values() if not (DATA / f).is_file()]
    if missing:
        pytest.fail(f"evaluation data missing: expected {', '.join(missing)} in {DATA} (the shared data directory "
                    f"beside the repository; see README.md, 'Tests and benchmarks')", pytrace=False)
    return DATA


@pytest.fixture(scope="session")
def gpqa_rows() -> list[dict]:
    rows = []
    for i in range(6):
        rows.append({
            "Record ID": f"synthetic-{i}",
            "Question": f"Synthetic check {i}: which of the options below is the one labelled correct?",
            "Correct Answer": f"the correct one ({i})",
            "Incorrect Answer 1": f"a distractor ({i}.1)",
            "Incorrect Answer 2": f"another distractor ({i}.2)",
            "Incorrect Answer 3": f"a third distractor ({i}.3)",
        })
    return rows


@pytest.fixture(scope="session")
def gpqa_file(tmp_path_factory, gpqa_rows) -> Path:
    path = tmp_path_factory.mktemp("gpqa") / "gpqa_diamond.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gpqa_rows))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from iwsft.tiny import build_tiny_assets

    paths = build_tiny_assets(tmp_path_factory.mktemp("tiny"))
    return Path(paths["model_dir"])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("IWSFT_EVAL_DATA", raising=False)


# ------------------------------------------------------------------------------------------------ fake models


def _gold_lookup(data_dir: Path, gpqa_rows: list[dict]):
    """prompt -> s1-style oracle answer, built from the raw data files (independent of evals.data)."""
    math_gold = []
    for name in DATA_FILES.values():
        for line in (data_dir / name).read_text().splitlines():
            row = json.loads(line)
            math_gold.append((row["problem"], row["answer"]))

    def answer_for(prompt: str) -> str:
        for q in gpqa_rows:
            if q["Question"] in prompt:
                # the letter is whatever line of the prompt carries the correct answer's text
                pattern = r"^([A-D])\) " + re.escape(q["Correct Answer"]) + r"(?:$|<\|im_end\|>)"
                m = re.search(pattern, prompt, re.MULTILINE)
                assert m, prompt
                return m.group(1)
        hits = [a for p, a in math_gold if p in prompt]
        assert hits, prompt[:200]
        # the longest problem contained in the prompt (a short problem could be a substring of a longer one)
        return max(((p, a) for p, a in math_gold if p in prompt), key=lambda t: len(t[0]))[1]

    return answer_for


def _register_fake(name: str, respond):
    import lm_eval.models  # noqa: F401  (built-in models first: lm-eval only adds them to an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model

    if name in model_registry:
        return

    @register_model(name)
    class Fake(LM):
        def __init__(self, **kwargs):
            super().__init__()

        def generate_until(self, requests, disable_tqdm=False):
            return [respond(r.args[0]) for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat_history) + \
                "<|im_start|>assistant\n"

        def chat_template(self, chat_template=False):
            return ""

        @property
        def tokenizer_name(self):
            return name


def _oracle_text(gold: str) -> str:
    ans = f"{int(gold):03d}" if gold.isdigit() else gold  # AIME golds come back zero-padded
    return (f"<|im_start|>think\nLet me work it out. Maybe \\boxed{{wrong}}.\n<|im_start|>answer\n"
            f"The final result is $\\boxed{{{ans}}}$.")


def _run_fake(model: str, tmp_path, data_dir, gpqa_file, repeats=1, limit=None, keys=None):
    import lm_eval.api.registry as reg

    from evals.run import evaluate_run, summarise_run

    keys = keys or ["aime24", "aime25", "math500", "gpqa_diamond"]
    lm = reg.get_model(model)()
    meta = {"data_dir": str(data_dir), "gpqa_data": str(gpqa_file)}
    gk = {"do_sample": repeats > 1, "temperature": 0.7 if repeats > 1 else 0.0, "max_gen_toks": 32}
    res, smp = evaluate_run(lm, keys, meta, tmp_path / model, repeats=repeats, gen_kwargs=gk, limit=limit, seed=0)
    return res, smp, summarise_run(res, smp, keys, n_boot=200, seed=0)


def test_oracle_scores_100_nonsense_0(tmp_path, data_dir, gpqa_rows, gpqa_file):
    lookup = _gold_lookup(data_dir, gpqa_rows)
    _register_fake("iwsft_test_oracle", lambda prompt: _oracle_text(lookup(prompt)))
    _register_fake("iwsft_test_nonsense", lambda prompt: "I like turtles. The end.")
    _register_fake("iwsft_test_wrong", lambda prompt: "<|im_start|>answer\nAnswer: \\boxed{-1}")

    expected_n = {"aime24": 30, "aime25": 30, "math500": 60, "gpqa_diamond": 6}
    res, smp, summ = _run_fake("iwsft_test_oracle", tmp_path, data_dir, gpqa_file, limit=60)
    for key, n in expected_n.items():
        s = summ[key]
        assert (s["n"], s["k"], s["acc"], s["maj_at_k"], s["pass_at_k"], s["unparseable"]) == (n, 1, 1.0, 1.0, 1.0, 0)
        assert s["ci95"] == [1.0, 1.0]
    # the prompt is the bare problem as the user turn
    first = smp["aime24_iwsft"][0]
    prompt = first["arguments"]["gen_args_0"]["arg_0"]
    assert prompt == f"<|im_start|>user\n{first['doc']['problem']}<|im_end|>\n<|im_start|>assistant\n"
    assert first["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 32
    # lm-eval's own files were written
    files = {Path(f).name.split("_20")[0] for f in res["files"]}
    assert files == {"results", "samples_aime24_iwsft", "samples_aime25_iwsft", "samples_math500_iwsft",
                     "samples_gpqa_diamond_iwsft"}

    _, _, summ = _run_fake("iwsft_test_nonsense", tmp_path, data_dir, gpqa_file, limit=5)
    for key in expected_n:
        assert (summ[key]["acc"], summ[key]["unparseable"]) == (0.0, min(5, expected_n[key]))
    _, _, summ = _run_fake("iwsft_test_wrong", tmp_path, data_dir, gpqa_file, limit=5)
    for key in ("aime24", "aime25", "math500"):
        assert (summ[key]["acc"], summ[key]["unparseable"]) == (0.0, 0)
    assert (summ["gpqa_diamond"]["acc"], summ["gpqa_diamond"]["unparseable"]) == (0.0, 5)  # "-1" is no letter


def test_sampling_metrics_through_lm_eval(tmp_path, data_dir, gpqa_rows, gpqa_file):
    """k = 4 outputs per problem from a model right on calls 1 and 3 of every 4: avg 0.5, maj 0 (tie goes to the
    first answer, which is wrong), pass 1; then a model right 3 of 4 times: maj 1."""
    lookup = _gold_lookup(data_dir, gpqa_rows)
    counter = {"n": 0}

    def half(prompt):
        counter["n"] += 1
        return _oracle_text(lookup(prompt)) if counter["n"] % 2 == 0 else "Answer: \\boxed{99999}"

    _register_fake("iwsft_test_half", half)
    _, smp, summ = _run_fake("iwsft_test_half", tmp_path, data_dir, gpqa_file, repeats=4, limit=3,
                             keys=["aime24", "math500"])
    for key in ("aime24", "math500"):
        s = summ[key]
        assert (s["k"], s["acc"], s["maj_at_k"], s["pass_at_k"], s["unparseable"]) == (4, 0.5, 0.0, 1.0, 0)
    assert len(smp["aime24_iwsft"][0]["resps"][0]) == 4


# ------------------------------------------------------------------------------------------------ tiny HF model


def _runner(args: list[str]):
    from evals.run import main

    assert main(args) == 0


def test_runner_tiny_model_all_tasks_compare(tmp_path, data_dir, gpqa_file, tiny_model, capsys):
    other = tmp_path / "iwsft_ckpt" / "epoch_0"
    shutil.copytree(tiny_model, other)
    out = tmp_path / "out"
    _runner(["--checkpoint", str(tiny_model), "--compare", str(other), "--backend", "hf", "--tasks",
             "aime24,aime25,math500,gpqa", "--limit", "2", "--max-gen-toks", "4", "--samples", "2",
             "--temperature", "0.7", "--batch-size", "1", "--data-dir", str(data_dir), "--gpqa-data",
             str(gpqa_file), "--output", str(out), "--bootstrap", "200"])
    printed = capsys.readouterr().out
    table = (out / "summary.txt").read_text()
    assert table.strip() in printed
    header = table.splitlines()[0].split()
    assert header[:6] == ["task", "model", "n", "greedy", "no_answer", "truncated"] and "avg@2" in header
    rows = [ln for ln in table.splitlines()[2:] if ln.strip() and ln.split()[0].endswith("_iwsft")]
    assert len(rows) == 8  # 4 tasks x 2 checkpoints
    assert {r.split()[1] for r in rows} == {"model", "epoch_0"}

    summaries = json.loads((out / "summaries.json").read_text())["checkpoints"]
    assert [s["label"] for s in summaries] == ["model", "epoch_0"]
    truncated_total = 0
    for s in summaries:
        assert s["backend"] == "hf" and s["model_args"]["max_length"] == s["settings"]["max_model_len"]
        assert s["settings"]["max_model_len"] >= s["settings"]["longest_prompt_tokens"] + 4
        for run, k in (("greedy", 1), ("sampled", 2)):
            r = s["runs"][run]
            for key in ("aime24", "aime25", "math500", "gpqa_diamond"):
                t = r["tasks"][key]
                assert (t["n"], t["k"]) == (2, k)
                assert 0.0 <= t["acc"] <= 1.0 and 0 <= t["unparseable"] <= 2 * k
                # unread outputs split by the generated token count: the random model mostly runs to
                # --max-gen-toks 4 (truncated); one that emits its end-of-turn token first is no_answer
                assert t["truncation_from"] == "tokens"
                assert t["no_answer"] + t["truncated"] == t["unparseable"]
                truncated_total += t["truncated"]
                assert t["ci95"][0] <= t["acc"] <= t["ci95"][1]
            results = [f for f in r["files"] if Path(f).name.startswith("results_")]
            assert len(results) == 1
            res = json.loads(Path(results[0]).read_text())
            assert set(res["results"]) == {"aime24_iwsft", "aime25_iwsft", "math500_iwsft", "gpqa_diamond_iwsft"}
            assert res["configs"]["aime24_iwsft"]["repeats"] == k
            gk = res["configs"]["math500_iwsft"]["generation_kwargs"]
            assert gk["max_gen_toks"] == 4 and gk["temperature"] == (0.0 if k == 1 else 0.7)
            samples = [f for f in r["files"] if Path(f).name.startswith("samples_gpqa_diamond_iwsft")]
            lines = Path(samples[0]).read_text().splitlines()
            assert len(lines) == 2 and len(json.loads(lines[0])["resps"][0]) == k
    assert truncated_total > 0
    # a finished output directory can stand in for a checkpoint in a later comparison
    _runner(["--checkpoint", str(out / "model"), "--compare", str(out / "epoch_0"), "--tasks", "aime24",
             "--output", str(tmp_path / "again")])
    assert (tmp_path / "again" / "summary.txt").read_text() == table


@pytest.mark.slow
def test_lm_eval_cli_all_tasks(tmp_path, data_dir, gpqa_file, tiny_model):
    """The stock CLI with --include_path (it indexes lm-eval's built-in tasks too: 25-30 s)."""
    out = tmp_path / "cli"
    cmd = [
        str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "hf",
        "--model_args", f"pretrained={tiny_model},dtype=float32", "--device", "cpu", "--batch_size", "1",
        "--tasks", "aime24_iwsft,aime25_iwsft,math500_iwsft,gpqa_diamond_iwsft",
        "--include_path", str(REPO / "evals"), "--apply_chat_template", "--log_samples",
        "--output_path", str(out), "--limit", "2", "--gen_kwargs", "max_gen_toks=4",
        "--metadata", f"data_dir={data_dir}", f"gpqa_data={gpqa_file}",
    ]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    env.pop("IWSFT_EVAL_DATA", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    for t in ("aime24_iwsft", "aime25_iwsft", "math500_iwsft", "gpqa_diamond_iwsft"):
        r = res["results"][t]
        assert set(r) >= {"acc,none", "maj_at_k,none", "pass_at_k,none", "no_answer,none", "truncated,none",
                          "unparseable,none"}
        assert 0 <= r["unparseable,none"] <= 2
        assert res["n-samples"][t]["effective"] == 2
        samples = list(out.rglob(f"samples_{t}_*.jsonl"))
        assert len(samples) == 1
        first = json.loads(samples[0].read_text().splitlines()[0])
        prompt = first["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.endswith(f"<|im_start|>user\n{first['doc']['problem']}<|im_end|>\n<|im_start|>assistant\n")
        assert {"acc", "maj_at_k", "pass_at_k", "no_answer", "truncated", "unparseable"} <= set(first)
    gpqa_doc = json.loads(next(out.rglob("samples_gpqa_diamond_iwsft_*.jsonl")).read_text().splitlines()[0])["doc"]
    assert gpqa_doc["problem"].startswith("Synthetic check 0:") and "\nA) " in gpqa_doc["problem"]


def test_oracle_every_problem(tmp_path, data_dir, gpqa_rows, gpqa_file):
    """All 560 AIME/MATH500 problems: every gold answer, written the s1 way, is scored correct (~10 s)."""
    lookup = _gold_lookup(data_dir, gpqa_rows)
    _register_fake("iwsft_test_oracle", lambda prompt: _oracle_text(lookup(prompt)))
    _, _, summ = _run_fake("iwsft_test_oracle", tmp_path, data_dir, gpqa_file, keys=["aime24", "aime25", "math500"])
    assert {k: (s["n"], s["acc"], s["unparseable"]) for k, s in summ.items()} == {
        "aime24": (30, 1.0, 0), "aime25": (30, 1.0, 0), "math500": (500, 1.0, 0)}


# ------------------------------------------------------------------------------------------------ budget forcing


def test_vllm_budget_forcing_model_with_fake_vllm(tmp_path, monkeypatch, data_dir, gpqa_file, tiny_model):
    """The registered-model wrapper (lm-eval's VLLM subclass) end to end through the aime24 task, with the
    ``vllm`` package replaced by fakes (vLLM cannot be installed here): prompts, SamplingParams, Waits, extraction."""
    import importlib.machinery
    import importlib.metadata
    import types

    from transformers import AutoTokenizer

    import evals.budget

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class TokensPrompt(dict):
        pass

    class Completion:
        def __init__(self, text, n):
            self.outputs = [types.SimpleNamespace(text=text, token_ids=list(range(n)))]

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def generate(self, inputs, sampling_params, use_tqdm=False, **kw):
            outs = []
            for inp, sp in zip(inputs, sampling_params):
                text = tok.decode(inp["prompt_token_ids"], skip_special_tokens=False)
                calls.append((text, sp.kw))
                if text.endswith("Final Answer:"):
                    outs.append(Completion(" $\\boxed{204}$", 6))
                elif text.endswith("Wait"):
                    outs.append(Completion(", let me double check.\n", 7))
                else:
                    outs.append(Completion("\nSome thinking.\n", 5))
            return outs

    def fake_module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(mod, k, v)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    fake_module("vllm", LLM=LLM, SamplingParams=SamplingParams, TokensPrompt=TokensPrompt)
    fake_module("vllm.lora")
    fake_module("vllm.lora.request", LoRARequest=object)
    fake_module("vllm.tokenizers", get_tokenizer=lambda name, **kw: AutoTokenizer.from_pretrained(name))
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.8.0" if n == "vllm" else real_version(n))
    monkeypatch.delitem(sys.modules, "lm_eval.models.vllm_causallms", raising=False)
    monkeypatch.setattr(evals.budget, "_CLASS", None)
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    # importing lm-eval's vLLM module registers its (here: fake-backed) class under "vllm"; undo that afterwards
    monkeypatch.setitem(model_registry._objs, "vllm", model_registry._objs["vllm"])
    try:
        cls = evals.budget.VLLMBudgetForcing
        lm = cls(pretrained=str(tiny_model), max_model_len=4096, bf_wait=1, bf_thinking_tokens=50)
        from evals.run import evaluate_run, summarise_run

        res, smp = evaluate_run(lm, ["aime24"], {"data_dir": str(data_dir)}, tmp_path / "bf", repeats=1,
                                gen_kwargs={"do_sample": False, "temperature": 0.0, "max_gen_toks": 300},
                                limit=2, seed=0)
    finally:
        sys.modules.pop("lm_eval.models.vllm_causallms", None)
    summ = summarise_run(res, smp, ["aime24"], n_boot=100, seed=0)["aime24"]
    assert (summ["n"], summ["acc"], summ["unparseable"]) == (2, 0.5, 0)  # 2024-I-1 is 204, 2024-I-2 is 25
    assert len(calls) == 6  # 2 problems x (think, Wait, answer)
    think, wait, answer = calls[0], calls[2], calls[4]
    assert think[0].endswith("<|im_start|>assistant\n<|im_start|>think")
    assert think[1]["max_tokens"] == 50 and think[1]["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert think[1]["skip_special_tokens"] is False and think[1]["temperature"] == 0.0
    assert wait[0].endswith("<|im_start|>think\nSome thinking.\nWait") and wait[1]["max_tokens"] == 45
    assert wait[1]["min_tokens"] == 1
    assert answer[0].endswith("double check.\n<|im_start|>answer\nFinal Answer:")
    assert answer[1]["max_tokens"] == 300 - 12 and "<|im_end|>" in answer[1]["stop"]
    out = smp["aime24_iwsft"][0]["resps"][0][0]
    assert out == ("<|im_start|>think\nSome thinking.\nWait, let me double check.\n<|im_start|>answer\n"
                   "Final Answer: $\\boxed{204}$")


def test_runner_without_gpqa_explains_access(tmp_path, monkeypatch, tiny_model, capsys):
    import evals.data
    from evals.run import main

    def offline(src):
        raise ConnectionError(f"Couldn't reach '{src.hf_path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(evals.data, "_hub_rows", offline)
    monkeypatch.delenv("IWSFT_GPQA_DATA", raising=False)
    rc = main(["--checkpoint", str(tiny_model), "--backend", "hf", "--tasks", "gpqa", "--limit", "1",
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "GPQA Diamond is not shipped" in err and "IWSFT_GPQA_DATA" in err and "--gpqa-data" in err
