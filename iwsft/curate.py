"""Self-curation: sample ``k`` answers per prompt from a checkpoint, verify them, write a data set the recipe reads.

``python -m iwsft.curate --model CKPT --prompts prompts.jsonl --out OUT [-k 8] [--temperature 1.0] [--top-p 1.0]``

This is the setting in which iw-SFT is exact (rejection-sampling fine-tuning, STaR, ReST-EM, expert iteration):
the curated data come from the model's *own* samples, so ``p_ref`` — the sampling policy — is known token by
token. For every sample the command records the sampled token ids and ``log p_ref(y_t | x, y_<t)`` **under the
sampling distribution**, i.e. after temperature and top-p are applied (that distribution IS the policy that
produced the data). The recipe reads them with ``reference.strategy: dataset`` (no precompute pass), exact for any
temperature.

Pipeline (one prompt group of ``k`` samples at a time, batched):

1. prompts: a JSON/JSONL/parquet/CSV file (or anything :func:`iwsft.tune.datasets.load_rows` loads) with a
   question column and a reference-answer column (``--question-column``/``--answer-column``, default
   ``question``/``answer``; ``--id-column`` optional, else the row index). Rows without a usable answer are not
   sampled; they are counted (``prompts_without_answer``) and listed in the summary. If no row has one, there is
   nothing to sample and the run stops with an error (usually a wrong ``--answer-column``).
2. sampling backends: ``transformers`` (CPU or GPU; ``generate`` with the KV cache, left-padded batches of
   ``--batch-prompts`` prompts × ``k`` samples, per-token log-probs from the *processed* scores) or ``vllm``
   (``--backend vllm``, import-guarded: used only when installed; ``logprobs_mode=processed_logprobs``; not tested
   in this repository's CI, which has no GPU).
3. verification: the checker of ``evals/`` (``--verifier math`` = ``evals.scoring.score_math`` (math-verify),
   ``aime`` (integers), ``gpqa`` (letters)) or a custom ``module:function`` called as ``fn(output, answer)`` and
   returning a ``Verdict``-like object (``.correct``), a bool or a number in [0, 1]. An empty generation gets
   reward 0 without calling the verifier; a verifier that raises gives reward 0 and is counted
   (``verifier_errors``, first message kept) — never silently dropped, never counted correct. If every sample of
   the first batch makes the verifier raise, the run stops (a broken verifier would otherwise burn the budget).
4. output ``OUT/samples.jsonl`` (one row per sample): ``messages`` (chat rows: system, user, assistant),
   ``reward``, ``correct``, ``pred``, ``parseable``, ``verify_error``, ``prompt_id``, ``prompt_index``,
   ``sample_index``, ``uid`` (``"{prompt_id}/{j}"``), ``answer``, ``prompt_token_ids``, ``response_token_ids``
   (the sampled ids, ending with the EOS id when the sample stopped), ``response_logprobs`` (same length, fp32
   values as floats), ``finish_reason`` (``stop``/``length``), ``roundtrip`` (whether decoding and re-encoding
   the response gives the same ids), ``model_fingerprint``. ``OUT/curate.json`` holds the settings (sampling,
   verifier, backend, model fingerprint, prompt-file fingerprint); ``OUT/summary.json`` the summary.

Resumable: the ``k`` rows of a prompt are appended in one write and fsynced; on restart ``curate.json`` must match
(else the run stops and lists what differs), incomplete trailing groups (a run killed mid-write) are removed, and
sampling continues at the next unfinished prompt — nothing is duplicated.

Summary (``summary.json`` and printed): accuracy (mean reward over all samples), ``pass@1`` and ``pass@k``
(unbiased estimator of Chen et al. 2021 over the prompts that were sampled), the share of prompts with at least one
verified sample, and every bad-input count (prompts without answer, empty generations, verifier errors,
unparseable outputs, truncated samples, non-round-trip samples), samples/s and generated tokens/s.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "curate.json"
SUMMARY_FILE = "summary.json"


class VerifierBroken(RuntimeError):
    """The verifier raised on every sample of the first batch (a user error: the verifier, not the data)."""


class SettingError(ValueError):
    """An invalid setting: ``str(e)`` is ``"name=value: reason and fix"`` (the Python API's names); ``main`` prints
    it under the command-line flag instead (``--top-p 2.0: ...``, see :data:`FLAGS`)."""

    def __init__(self, name: str, value: Any, reason: str):
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason

    def for_cli(self) -> str:
        number = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
        v = self.value if number else repr(self.value)
        return f"{FLAGS.get(self.name, self.name)} {v}: {self.reason}"


# the command-line flag of each SettingError name (the Python API names them by their argument)
FLAGS = {"k": "-k/--k", "temperature": "--temperature", "top_p": "--top-p", "max_new_tokens": "--max-new-tokens",
         "batch_prompts": "--batch-prompts", "verifier": "--verifier", "limit": "--limit"}


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling policy ``p_ref`` (and how it is run).

    ``temperature > 0`` (``temperature = 0`` is greedy: a point mass, no importance weights exist for it);
    ``top_p`` in (0, 1]; ``max_new_tokens`` per sample; ``k`` samples per prompt; ``batch_prompts`` prompts per
    generation batch (the batch is ``batch_prompts × k`` sequences); ``seed`` seeds each batch
    (``seed · 1_000_003 + index of its first prompt``); ``system_prompt`` is the system turn of every prompt
    (``None``: no system turn; default: Qwen2.5's default prompt, which its chat template adds anyway).
    """

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_prompts: int = 8
    seed: int = 0
    system_prompt: Optional[str] = QWEN_DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 1):
            raise SettingError("k", self.k, "samples per prompt must be an integer >= 1 (e.g. 8)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SettingError("temperature", self.temperature,
                               "must be > 0 (1.0 samples the model's own distribution): greedy decoding is not a "
                               "sampling policy with log-probs (every log p_ref would be 0)")
        if not (0 < self.top_p <= 1):
            raise SettingError("top_p", self.top_p, "must be in (0, 1] (1.0: no nucleus cut)")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise SettingError("max_new_tokens", self.max_new_tokens, "must be an integer >= 1 (e.g. 256)")
        if not (isinstance(self.batch_prompts, int) and self.batch_prompts >= 1):
            raise SettingError("batch_prompts", self.batch_prompts, "must be an integer >= 1 (e.g. 8)")

    def policy(self) -> Dict[str, Any]:
        """The settings that define the sampling distribution (what ``log p_ref`` is the log-prob under)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt}


def _sha256_file(path: Path, limit: int = 2 << 30) -> str:
    """sha256 of a file; files over ``limit`` bytes hash their size and first and last 16 MiB (cheap for 65 GB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read(16 << 20))
    return h.hexdigest()


def model_fingerprint(model_dir) -> str:
    """Short sha256 over ``config.json``, the tokenizer files and the weight files of an HF model directory."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist: pass an HF model directory (weights + "
                                "tokenizer) as --model")
    names = ["config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
    files = [d / n for n in names if (d / n).is_file()] + sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        raise FileNotFoundError(f"{d} holds no *.safetensors / *.bin weights: pass an HF model directory")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_file(f).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    index: int  # row index in the prompt file
    prompt_id: str
    question: str
    answer: Optional[str]  # None: no usable reference answer (counted, not sampled)


def _clean_answer(v) -> Optional[str]:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def load_prompts(source, question_column: str = "question", answer_column: str = "answer",
                 id_column: Optional[str] = None, split: str = "train", limit: Optional[int] = None) -> List[Prompt]:
    """Rows of ``source`` (file or hub id, via :func:`iwsft.tune.datasets.load_rows`) as :class:`Prompt` s.

    Raises ``FileNotFoundError`` for a local prompt file that does not exist, ``KeyError`` naming the column (and
    the columns that exist) when a column is missing, ``ValueError`` for an empty file, a row whose question is not
    a non-empty string or duplicate ids (messages name ``--prompts`` / the column flags), :class:`SettingError`
    for ``limit < 1``. A missing/empty/NaN answer is kept as ``answer=None`` (reported, not sampled); a
    ``ValueError`` when *every* row lacks one (nothing could be sampled: usually the wrong ``--answer-column``).
    """
    from iwsft.tune.datasets import load_rows

    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        raise SettingError("limit", limit, "must be an integer >= 1 (or left out: every row)")

    src = Path(os.path.expanduser(str(source)))
    if not src.exists() and (src.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv") or src.is_absolute()
                             or str(source).startswith(".")):
        raise FileNotFoundError(f"prompt file {source} does not exist: pass an existing file (or a hub dataset id) "
                                "as --prompts")
    try:
        rows = load_rows(str(source), split=split)
    except ValueError as e:  # load_rows names the recipe key (dataset.source); here the file came from --prompts
        raise ValueError(str(e).replace("dataset.source", "--prompts")) from e
    cols = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    for col in (question_column, answer_column) + ((id_column,) if id_column else ()):
        if col not in cols:
            raise KeyError(f"prompt file {source} has no column {col!r} (columns: {cols}); "
                           "set --question-column / --answer-column / --id-column")
    out, seen = [], set()
    n = len(rows) if limit is None else min(limit, len(rows))
    for i in range(n):
        row = rows[i]
        q = row[question_column]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"prompt file {source}, row {i}: column {question_column!r} must be a non-empty string, "
                             f"got {q!r}")
        pid = str(row[id_column]) if id_column else str(i)
        if pid in seen:
            raise ValueError(f"prompt file {source}, row {i}: duplicate id {pid!r} in column {id_column!r}")
        seen.add(pid)
        out.append(Prompt(i, pid, q, _clean_answer(row[answer_column])))
    if out and all(p.answer is None for p in out):
        rows_read = f"{len(out)} row{'s' * (len(out) != 1)}" + (" read (--limit)" if limit else "")
        raise ValueError(f"prompt file {source}: all {rows_read} lack an "
                         f"answer in column {answer_column!r} (empty, null or NaN), so there is nothing to sample: "
                         "set --answer-column to the column holding the reference answers, or fill them in")
    return out


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.index, p.prompt_id, p.question, p.answer]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# verification


@dataclass
class Check:
    reward: float
    pred: Optional[str] = None
    parseable: bool = False
    error: Optional[str] = None


def resolve_verifier(spec: str) -> Callable[[str, str], Any]:
    """``math`` | ``aime`` | ``gpqa`` (the checkers of ``evals.scoring``) or ``package.module:function``.

    Raises :class:`SettingError` (name ``verifier``) when ``spec`` is neither, the module cannot be imported (any
    exception while importing it), it has no such attribute, or the attribute is not callable.
    """
    if spec in ("math", "aime", "gpqa"):
        from evals import scoring

        return getattr(scoring, f"score_{spec}")
    fix = "use math, aime, gpqa or an importable module:function"
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise SettingError("verifier", spec, f"not a built-in verifier nor module:function; {fix}")
    try:
        module = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - a SyntaxError or a missing dependency of the user's module alike
        raise SettingError("verifier", spec, f"cannot import module {mod!r} ({type(e).__name__}: {e}); {fix} "
                           "(is its folder on PYTHONPATH?)") from e
    obj = getattr(module, fn, None)
    if obj is None:
        raise SettingError("verifier", spec, f"module {mod!r} has no {fn!r}; {fix}")
    if not callable(obj):
        raise SettingError("verifier", spec, f"{mod}.{fn} is a {type(obj).__name__}, not a function; {fix}")
    return obj


def verify(fn: Callable[[str, str], Any], output: str, answer: str) -> Check:
    """Runs the verifier on one sample. Empty output → reward 0 (verifier not called); an exception or an
    unusable return value → reward 0 with ``error`` set."""
    if not output.strip():
        return Check(0.0, None, False, None)
    try:
        v = fn(output, answer)
        if hasattr(v, "correct"):
            return Check(float(bool(v.correct)), getattr(v, "pred", None), bool(getattr(v, "parseable", True)))
        if isinstance(v, bool):
            return Check(float(v), None, True)
        if isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1:
            return Check(float(v), None, True)
        raise TypeError(f"verifier returned {v!r}; expected a Verdict (.correct), a bool or a number in [0, 1]")
    except Exception as e:  # noqa: BLE001 - any verifier failure is counted and reported, never counted correct
        return Check(0.0, None, False, f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# sampling backends


@dataclass
class Sample:
    token_ids: List[int]  # sampled response ids, ending with EOS when finish_reason == "stop"
    logprobs: List[float]  # log p_ref of each sampled id under the sampling distribution
    finish_reason: str  # "stop" | "length"


class HFSampler:
    """``transformers`` backend: batched ``generate`` (KV cache on), left padding, processed-score log-probs.

    Memory note: ``generate(output_scores=True)`` keeps ``[batch_prompts · k, vocab]`` fp32 scores per generated
    step; choose ``batch_prompts`` so ``batch_prompts · k · max_new_tokens · vocab · 4`` bytes fit.
    """

    name = "transformers"

    def __init__(self, model_dir, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = device
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) or self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def prompt_ids(self, messages: List[Dict[str, str]]) -> List[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def roundtrip(self, ids: Sequence[int]) -> bool:
        """Whether re-encoding the decoded response gives the sampled ids (EOS excluded)."""
        body = list(ids[:-1]) if ids and ids[-1] in self.eos_ids else list(ids)
        return self.tokenizer.encode(self.decode(body), add_special_tokens=False) == body

    def sample(self, prompt_ids: List[List[int]], cfg: SamplingConfig, seed: int,
               greedy: bool = False) -> List[List[Sample]]:
        """``k`` samples for each prompt (``greedy``: one argmax continuation per prompt, log-probs of the model)."""
        from transformers import GenerationConfig

        torch = self.torch
        n = 1 if greedy else cfg.k
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for b, p in enumerate(prompt_ids):
            ids[b, width - len(p):] = torch.tensor(p)
            att[b, width - len(p):] = 1
        # Every setting that shapes the distribution is explicit: unset ones would take transformers' defaults
        # (top_k=50!) or the checkpoint's generation_config.json. (The recorded log-probs come from the processed
        # scores, so they would stay exact either way; explicit settings make them the documented policy.)
        gc = GenerationConfig(
            do_sample=not greedy, temperature=1.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p, top_k=None if greedy else 0, typical_p=1.0, min_p=None, repetition_penalty=1.0,
            no_repeat_ngram_size=0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_length=0, min_new_tokens=None,
            suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None, max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=n, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            output_scores=True, return_dict_in_generate=True, use_cache=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                      generation_config=gc)
        new = out.sequences[:, width:].cpu()  # [B·n, S]
        # log-softmax of the processed scores (temperature, top-p applied) = the sampling distribution
        logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).cpu()  # [B·n, S, V]
        chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B·n, S]
        result: List[List[Sample]] = []
        for b in range(len(prompt_ids)):
            group = []
            for j in range(n):
                r = b * n + j
                toks, lps, reason = [], [], "length"
                for t in range(new.shape[1]):
                    tid = int(new[r, t])
                    toks.append(tid)
                    lps.append(float(chosen[r, t]))
                    if tid in self.eos_ids:
                        reason = "stop"
                        break
                group.append(Sample(toks, lps, reason))
            result.append(group)
        return result


class VLLMSampler:  # pragma: no cover - needs a GPU and vllm; not exercised by this repository's tests
    """vLLM backend (GPU). Log-probs of the sampled tokens after temperature/top-p (``processed_logprobs``)."""

    name = "vllm"

    def __init__(self, model_dir, dtype: str = "float32", **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("--backend vllm needs vllm (pip install vllm) on a GPU machine; "
                              "use --backend transformers on CPU") from e
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.llm = LLM(model=str(model_dir), dtype=dtype, logprobs_mode="processed_logprobs", **llm_kwargs)
        eos = self.llm.get_tokenizer().eos_token_id
        self.eos_ids = {eos}

    prompt_ids = HFSampler.prompt_ids
    decode = HFSampler.decode
    roundtrip = HFSampler.roundtrip

    def sample(self, prompt_ids, cfg: SamplingConfig, seed: int, greedy: bool = False):
        from vllm import SamplingParams, TokensPrompt

        n = 1 if greedy else cfg.k
        sp = SamplingParams(n=n, temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, top_k=-1,
                            max_tokens=cfg.max_new_tokens, logprobs=0, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp, use_tqdm=False)
        result = []
        for o in outs:
            group = []
            for c in o.outputs:
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs, c.token_ids)]
                ids = list(c.token_ids)
                # "stop" here means: ended with the sampled EOS id (whose log-prob is recorded, as on CPU)
                stopped = c.finish_reason == "stop" and bool(ids) and ids[-1] in self.eos_ids
                group.append(Sample(ids, lps, "stop" if stopped else "length"))
            result.append(group)
        return result


def make_sampler(backend: str, model_dir, device: str = "cpu", dtype: str = "float32"):
    """``auto`` (vLLM if importable and a GPU is present, else transformers) | ``transformers`` | ``vllm``."""
    if backend == "auto":
        try:
            import importlib.util

            import torch

            backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"
        except ImportError:
            backend = "transformers"
    if backend == "vllm":
        return VLLMSampler(model_dir, dtype=dtype)
    if backend == "transformers":
        return HFSampler(model_dir, device=device, dtype=dtype)
    raise ValueError(f"backend={backend!r}: use auto, transformers or vllm")


# ----------------------------------------------------------------------------------------------------------------
# resumable output


def _read_complete_groups(path: Path, k: int) -> Tuple[List[dict], int]:
    """Rows of complete prompt groups (``k`` rows each) in ``path``; returns (rows, number of rows discarded)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    raw = path.read_bytes()
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill mid-write
            bad += 1
    by_prompt: Dict[str, List[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    keep = [r for r in rows if len(by_prompt[r["prompt_id"]]) == k
            and sorted(x["sample_index"] for x in by_prompt[r["prompt_id"]]) == list(range(k))]
    return keep, bad + len(rows) - len(keep)


def _write_rows(path: Path, rows: List[dict], append: bool = True) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(data)  # one write per prompt group, then fsync: a kill leaves at most one partial group
            f.flush()
            os.fsync(f.fileno())
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021): ``1 − C(n−c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(rows: List[dict], prompts: Sequence[Prompt], k: int) -> Dict[str, Any]:
    """Accuracy, pass@1/pass@k, share of prompts with ≥ 1 verified sample, and every bad-input count."""
    by_prompt: Dict[str, List[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    n = len(rows)
    correct = [r["reward"] > 0 for r in rows]
    errors = [r for r in rows if r.get("verify_error")]
    groups = list(by_prompt.values())
    missing = [p.prompt_id for p in prompts if p.answer is None]
    return {
        "prompts": len(prompts),
        "prompts_sampled": len(groups),
        "prompts_without_answer": len(missing),
        "prompt_ids_without_answer": missing[:50],
        "samples": n,
        "k": k,
        "accuracy": sum(r["reward"] for r in rows) / n if n else float("nan"),
        "pass@1": (sum(pass_at_k(len(g), sum(x["reward"] > 0 for x in g), 1) for g in groups) / len(groups)
                   if groups else float("nan")),
        f"pass@{k}": (sum(pass_at_k(len(g), sum(x["reward"] > 0 for x in g), k) for g in groups) / len(groups)
                      if groups else float("nan")),
        "share_prompts_with_verified_sample": (sum(any(x["reward"] > 0 for x in g) for g in groups) / len(groups)
                                               if groups else float("nan")),
        "correct_samples": int(sum(correct)),
        "empty_generations": sum(1 for r in rows if not r["messages"][-1]["content"].strip()),
        "verifier_errors": len(errors),
        "first_verifier_error": errors[0]["verify_error"] if errors else None,
        "unparseable": sum(1 for r in rows if not r.get("parseable")),
        "truncated": sum(1 for r in rows if r["finish_reason"] == "length"),
        "not_roundtrip": sum(1 for r in rows if not r.get("roundtrip", True)),
        "mean_response_tokens": (sum(len(r["response_token_ids"]) for r in rows) / n) if n else float("nan"),
    }


def _settings(model_dir, prompts_fp: str, cfg: SamplingConfig, verifier: str, backend: str, fp: str) -> dict:
    return {"model": str(Path(model_dir).resolve()), "model_fingerprint": fp, "prompts_fingerprint": prompts_fp,
            "sampling": asdict(cfg), "verifier": verifier, "backend": backend, "format": 1}


def settings_diff(old: dict, new: dict) -> List[str]:
    """The keys whose value changed, one ``"key: old → new"`` each (sampling settings by their own name, e.g.
    ``k: 4 → 2``; the model path is not compared, its fingerprint is)."""
    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k not in ("sampling", "model")}, **(d.get("sampling") or {})}

    a, b = flat(old), flat(new)
    keys = list(b) + [k for k in a if k not in b]
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def curate(model_dir, prompts: Sequence[Prompt], out_dir, cfg: SamplingConfig = SamplingConfig(),
           verifier: str = "math", backend: str = "transformers", sampler=None, device: str = "cpu",
           progress: bool = True, overwrite: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Samples, verifies and writes ``out_dir/samples.jsonl`` (see the module docstring); returns the summary.

    ``sampler``: an already-built backend (reused across calls, e.g. by the study). Raises ``ValueError`` when
    no prompt has a reference answer (nothing to sample; nothing is written) or ``out_dir`` holds a run with other
    settings (unless ``overwrite``), :class:`SettingError` for a verifier that cannot be resolved, and
    :class:`VerifierBroken` (a
    ``RuntimeError``) when the verifier raised on every sample of the first batch — that batch's rows are removed
    from ``samples.jsonl`` first, so a rerun with a fixed verifier samples them again.
    """
    from tqdm import tqdm

    if not any(p.answer is not None for p in prompts):  # a run of 0 samples would "succeed" with accuracy nan
        raise ValueError(f"none of the {len(prompts)} prompts has a reference answer: nothing to sample")
    vfn = resolve_verifier(verifier)  # before the model: a typo in --verifier fails in a second
    fp = model_fingerprint(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(model_dir, prompts_fingerprint(prompts), cfg, verifier,
                         backend if sampler is None else sampler.name, fp)
    settings_path, samples_path = out / SETTINGS_FILE, out / SAMPLES_FILE
    if settings_path.is_file() and not overwrite:
        diff = settings_diff(json.loads(settings_path.read_text()), settings)
        if diff:
            raise ValueError(f"{out} holds a curation run with other settings ({'; '.join(diff)}): pass another "
                             "--out to keep it, or --overwrite to delete its samples and start again")
    elif overwrite and samples_path.exists():
        samples_path.unlink()
    rows, discarded = _read_complete_groups(samples_path, cfg.k)
    if discarded:
        _write_rows(samples_path, rows, append=False)  # drop a group cut by a kill: it is sampled again
    tmp = settings_path.with_name(".curate.json.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, settings_path)

    done = {r["prompt_id"] for r in rows}
    todo = [p for p in prompts if p.answer is not None and p.prompt_id not in done]
    if sampler is None:
        sampler = make_sampler(backend, model_dir, device=device)
    t0, new_samples, new_tokens = time.perf_counter(), 0, 0
    bar = tqdm(total=len(todo) * cfg.k, desc="sampling", unit="sample", disable=not progress)
    try:
        first_batch = True
        for start in range(0, len(todo), cfg.batch_prompts):
            batch = todo[start:start + cfg.batch_prompts]
            msgs = [([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else [])
                    + [{"role": "user", "content": p.question}] for p in batch]
            pids = [sampler.prompt_ids(m) for m in msgs]
            groups = sampler.sample(pids, cfg, seed=cfg.seed * 1_000_003 + batch[0].index)
            batch_rows = []
            for p, m, pid, group in zip(batch, msgs, pids, groups):
                g_rows = []
                for j, s in enumerate(group):
                    body = s.token_ids[:-1] if s.finish_reason == "stop" and s.token_ids[-1] in sampler.eos_ids \
                        else s.token_ids
                    text = sampler.decode(body)
                    chk = verify(vfn, text, p.answer)
                    g_rows.append({
                        "messages": m + [{"role": "assistant", "content": text}],
                        "reward": chk.reward, "correct": chk.reward > 0, "pred": chk.pred,
                        "parseable": chk.parseable,
                        "verify_error": chk.error, "prompt_id": p.prompt_id, "prompt_index": p.index,
                        "sample_index": j, "uid": f"{p.prompt_id}/{j}", "answer": p.answer,
                        "prompt_token_ids": pid, "response_token_ids": s.token_ids,
                        "response_logprobs": s.logprobs, "finish_reason": s.finish_reason,
                        "roundtrip": sampler.roundtrip(s.token_ids), "model_fingerprint": fp,
                    })
                    new_tokens += len(s.token_ids)
                _write_rows(samples_path, g_rows)
                batch_rows += g_rows
                bar.update(len(g_rows))
            if first_batch and batch_rows and all(r["verify_error"] for r in batch_rows):
                # A broken verifier: drop this batch's rows (reward 0 for a checker bug is not data), so that a
                # rerun with the verifier fixed samples these prompts again instead of resuming them.
                _write_rows(samples_path, rows, append=False)
                raise VerifierBroken(
                    f"the verifier {verifier!r} raised on every sample of the first batch (first error: "
                    f"{batch_rows[0]['verify_error']}); nothing of this batch was kept. Fix the verifier (called as "
                    "fn(output, answer); returns a Verdict, a bool or a number in [0, 1]) and rerun the same command: "
                    "it resumes where this run started.")
            first_batch = False
            rows += batch_rows
            new_samples += sum(len(g) for g in groups)
    finally:  # closing ends the bar's line, so an error printed next starts on a line of its own
        bar.close()
    dt = time.perf_counter() - t0
    summary = summarize(rows, prompts, cfg.k)
    summary.update({"new_samples": new_samples, "seconds": round(dt, 2),
                    "samples_per_second": new_samples / dt if new_samples and dt > 0 else None,
                    "generated_tokens_per_second": new_tokens / dt if new_tokens and dt > 0 else None,
                    "resumed_rows": len(rows) - new_samples, "discarded_partial_rows": discarded,
                    "backend": sampler.name, "model_fingerprint": fp, "sampling": cfg.policy()})
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY_FILE)
    if not quiet:
        print_summary(summary)
    return summary


def print_summary(s: Dict[str, Any]) -> None:
    k = s["k"]
    print(f"[curate] {s['samples']} samples of {s['prompts_sampled']} prompts (k={k}); accuracy {s['accuracy']:.3f}, "
          f"pass@1 {s['pass@1']:.3f}, pass@{k} {s[f'pass@{k}']:.3f}, prompts with >= 1 verified sample "
          f"{s['share_prompts_with_verified_sample']:.3f}")
    print(f"[curate] bad input: {s['prompts_without_answer']} prompts without answer, {s['empty_generations']} "
          f"empty generations, {s['verifier_errors']} verifier errors"
          + (f" (first: {s['first_verifier_error']})" if s['first_verifier_error'] else "")
          + f", {s['unparseable']} unparseable, {s['truncated']} truncated at max_new_tokens, "
          f"{s['not_roundtrip']} not re-tokenizing to the sampled ids")
    if s.get("samples_per_second"):
        print(f"[curate] {s['new_samples']} new samples in {s['seconds']:.1f} s: {s['samples_per_second']:.1f} "
              f"samples/s, {s['generated_tokens_per_second']:.0f} tokens/s ({s['backend']})")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m iwsft.curate`` (every option has a help text with its default)."""
    ap = argparse.ArgumentParser(prog="python -m iwsft.curate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (weights + tokenizer); required")
    ap.add_argument("--prompts", required=True,
                    help="prompt file (.json/.jsonl/.parquet/.csv) or hub dataset id; required")
    ap.add_argument("--out", required=True,
                    help="output directory (resumed when it holds a run with the same settings); required")
    ap.add_argument("--question-column", default="question",
                    help="column of the prompt file holding the question (default: %(default)s)")
    ap.add_argument("--answer-column", default="answer",
                    help="column holding the reference answer; rows where it is empty/null are counted, not sampled "
                         "(default: %(default)s)")
    ap.add_argument("--id-column", default=None,
                    help="column holding a unique prompt id (default: none, the row index is the id)")
    ap.add_argument("--split", default="train",
                    help="split to read when --prompts is a hub dataset id (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N rows only, N >= 1 (default: every row)")
    ap.add_argument("-k", "--k", type=int, default=8, help="samples per prompt (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature, > 0; the recorded log-probs are under it (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="nucleus sampling mass in (0, 1]; 1.0 = no cut (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=256,
                    help="most tokens generated per sample; longer ones are counted as truncated (default: "
                         "%(default)s)")
    ap.add_argument("--batch-prompts", type=int, default=8,
                    help="prompts per generation batch (batch_prompts x k sequences at once; lower it if memory "
                         "runs out) (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="sampling seed; batch seed = seed * 1000003 + index of its first prompt (default: "
                         "%(default)s)")
    ap.add_argument("--no-system-prompt", action="store_true",
                    help="no system turn (default: off, every prompt gets Qwen's default system prompt)")
    ap.add_argument("--verifier", default="math",
                    help="math | aime | gpqa | module:function called as fn(output, answer) (default: %(default)s)")
    ap.add_argument("--backend", default="auto", choices=("auto", "transformers", "vllm"),
                    help="auto = vllm if installed and a GPU is present, else transformers (default: %(default)s)")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the transformers backend, e.g. cpu or cuda (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete the samples of a run in --out with other settings and start again (default: off, "
                         "such a run is refused)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        cfg = SamplingConfig(k=a.k, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                             batch_prompts=a.batch_prompts, seed=a.seed,
                             system_prompt=None if a.no_system_prompt else QWEN_DEFAULT_SYSTEM_PROMPT)
        prompts = load_prompts(a.prompts, a.question_column, a.answer_column, a.id_column, a.split, a.limit)
        curate(a.model, prompts, a.out, cfg, verifier=a.verifier, backend=a.backend, device=a.device,
               overwrite=a.overwrite)
    except USER_ERRORS as e:
        # bad input (settings, files, columns, a broken verifier): one line naming the flag and the fix, exit 2 like
        # argparse. Other exceptions are bugs and keep their traceback; IWSFT_DEBUG=1 shows it for these too.
        if os.environ.get("IWSFT_DEBUG"):
            raise
        msg = (e.for_cli() if isinstance(e, SettingError)  # the flag, not the Python argument name
               else e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


# the exceptions main() reports as user errors (one line, exit 2): what this module raises for bad input
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, VerifierBroken)


if __name__ == "__main__":
    sys.exit(main())
