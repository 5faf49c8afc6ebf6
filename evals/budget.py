"""Budget forcing (s1) for lm-eval's vLLM backend, as a registered model ``vllm_bf`` (no lm-eval fork).

Per prompt (all prompts of a batch advance together):

1. think phase: append ``<|im_start|>think`` and generate until the model opens its next segment (stop strings
   ``<|im_start|>`` / ``<|im_end|>``) or the thinking cap (``thinking_tokens``, counted over all think segments) is
   reached;
2. ``num_wait`` times, while thinking tokens remain: append ``Wait`` and continue thinking (at least one token),
   which suppresses the model's attempt to stop thinking;
3. answer phase: append ``<|im_start|>answer\\n`` plus ``Final Answer:`` and generate the answer with the task's stop
   sequences (``answer_tokens`` tokens, default: what is left of ``max_gen_toks``).

The returned continuation is everything after the prompt (think start, thinking, the Waits, the answer delimiter,
the answer), so the s1 extraction in :mod:`evals.extract` applies unchanged.

The control logic (:func:`budget_forced_generate`) is independent of vLLM: it takes a ``generate`` callable
``(prompts, params) -> [(text, num_new_tokens)]`` with ``params`` dicts ``{max_tokens, min_tokens, stop}``.
:class:`VLLMBudgetForcing` (built lazily, since importing lm-eval's vLLM backend needs vLLM) plugs in
``vllm.LLM.generate`` with ``vllm.SamplingParams`` and ``vllm.TokensPrompt``. Use it through
``python -m evals.run --backend vllm --budget-forcing N`` or ``python -m evals.lmeval run --model vllm_bf
--model_args pretrained=...,bf_wait=1,bf_thinking_tokens=32000 ...`` (the wrapper registers ``vllm_bf`` and then
runs the stock lm-eval CLI).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MODEL_NAME = "vllm_bf"

GenerateFn = Callable[[list[str], list[dict]], list[tuple[str, int]]]


@dataclass(frozen=True)
class BudgetForcingConfig:
    num_wait: int = 1  # how many times "Wait" replaces the end of thinking
    thinking_tokens: int = 32000  # cap on all thinking tokens of one output
    answer_tokens: int | None = None  # cap on the answer phase; None: max_gen_toks minus thinking tokens used
    think_start: str = "<|im_start|>think"  # appended to the prompt to open the think phase
    think_stop: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")  # strings that end a think segment
    wait: str = "Wait"  # appended when the model tries to stop thinking
    answer_start: str = "<|im_start|>answer\n"  # the s1 answer delimiter, appended after thinking
    final_answer: str = "Final Answer:"  # appended after the delimiter so the model answers at once

    def __post_init__(self):
        if self.num_wait < 0:
            raise ValueError("num_wait must be >= 0")
        if self.thinking_tokens < 1:
            raise ValueError("thinking_tokens must be >= 1")


def budget_forced_generate(
    prompts: Sequence[str],
    generate: GenerateFn,
    cfg: BudgetForcingConfig,
    max_gen_toks: int,
    until: Sequence[str] = (),
) -> list[str]:
    """Run budget forcing for ``prompts``; returns each continuation (text after the prompt)."""
    n = len(prompts)
    if n == 0:
        return []
    conts = [cfg.think_start for _ in range(n)]
    used = [0] * n

    def step(indices: list[int], params: list[dict]) -> None:
        outs = generate([prompts[i] + conts[i] for i in indices], params)
        if len(outs) != len(indices):
            raise RuntimeError(f"generate returned {len(outs)} outputs for {len(indices)} prompts")
        for i, (text, ntok) in zip(indices, outs):
            conts[i] += text
            used[i] += int(ntok)

    stop = list(cfg.think_stop)
    everyone = list(range(n))
    step(everyone, [{"max_tokens": cfg.thinking_tokens, "min_tokens": 0, "stop": stop} for _ in everyone])
    for _ in range(cfg.num_wait):
        active = [i for i in everyone if cfg.thinking_tokens - used[i] > 0]
        if not active:
            break
        for i in active:
            conts[i] += cfg.wait
        step(active, [{"max_tokens": cfg.thinking_tokens - used[i], "min_tokens": 1, "stop": stop} for i in active])

    params = []
    for i in everyone:
        sep = "" if conts[i].endswith("\n") else "\n"
        conts[i] += sep + cfg.answer_start + cfg.final_answer
        budget = cfg.answer_tokens if cfg.answer_tokens is not None else max_gen_toks - used[i]
        params.append({"max_tokens": max(1, int(budget)), "min_tokens": 0, "stop": list(until)})
    step(everyone, params)
    return conts


def make_vllm_generate(llm, encode: Callable[[str], list[int]], sampling_params_cls, tokens_prompt_cls,
                       sampling_kwargs: dict) -> GenerateFn:
    """A :data:`GenerateFn` on top of vLLM's public API (``LLM.generate``, ``SamplingParams``, ``TokensPrompt``)."""

    def generate(prompts: list[str], params: list[dict]) -> list[tuple[str, int]]:
        sps = [
            sampling_params_cls(max_tokens=p["max_tokens"], min_tokens=p["min_tokens"], stop=p["stop"],
                                **sampling_kwargs)
            for p in params
        ]
        inputs = [tokens_prompt_cls(prompt_token_ids=encode(p)) for p in prompts]
        outputs = llm.generate(inputs, sampling_params=sps, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    return generate


def generate_until_budget_forced(requests, make_generate: Callable[[dict], GenerateFn], cfg: BudgetForcingConfig,
                                 split_gen_kwargs: Callable[[dict], tuple[dict, list[str], int]]) -> list[str]:
    """lm-eval ``generate_until`` with budget forcing: requests grouped by identical generation kwargs.

    ``split_gen_kwargs(gen_kwargs) -> (sampling_kwargs, until, max_gen_toks)`` (lm-eval's ``modify_gen_kwargs``).
    """
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for idx, req in enumerate(requests):
        _, gen_kwargs = req.args
        groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(idx)
    for idxs in groups.values():
        sampling_kwargs, until, max_gen_toks = split_gen_kwargs(dict(requests[idxs[0]].args[1]))
        conts = budget_forced_generate([requests[i].args[0] for i in idxs], make_generate(sampling_kwargs), cfg,
                                       max_gen_toks, until)
        for i, c in zip(idxs, conts):
            results[i] = c
    return results  # type: ignore[return-value]


def _build_vllm_class():
    from lm_eval.models.vllm_causallms import VLLM
    from vllm import SamplingParams, TokensPrompt

    class VLLMBudgetForcing(VLLM):
        """lm-eval's ``vllm`` model with s1 budget forcing in ``generate_until`` (model args ``bf_*``)."""

        def __init__(self, *args, bf_wait: int = 1, bf_thinking_tokens: int = 32000,
                     bf_answer_tokens: int | None = None, bf_final_answer: str = "Final Answer:", **kwargs):
            super().__init__(*args, **kwargs)
            if getattr(self, "data_parallel_size", 1) > 1:
                raise ValueError("vllm_bf supports tensor parallelism only (data_parallel_size=1)")
            self.bf_config = BudgetForcingConfig(
                num_wait=int(bf_wait), thinking_tokens=int(bf_thinking_tokens),
                answer_tokens=None if bf_answer_tokens in (None, "None", "") else int(bf_answer_tokens),
                final_answer=str(bf_final_answer),
            )

        def generate_until(self, requests, disable_tqdm: bool = False):
            eos = self.tokenizer.decode(self.eot_token_id)

            def split(gen_kwargs):
                return self.modify_gen_kwargs(gen_kwargs, eos=eos, default_max_gen_toks=self.max_gen_toks)

            def make_generate(sampling_kwargs):
                return make_vllm_generate(self.model, self.tok_encode, SamplingParams, TokensPrompt,
                                          sampling_kwargs)

            res = generate_until_budget_forced(requests, make_generate, self.bf_config, split)
            for req, text in zip(requests, res):
                self.cache_hook.add_partial("generate_until", req.args, text)
            return res

    return VLLMBudgetForcing


_CLASS = None


def __getattr__(name: str):
    # ``evals.budget:VLLMBudgetForcing`` is the lazy registry target: vLLM is imported only when it is used.
    global _CLASS
    if name == "VLLMBudgetForcing":
        if _CLASS is None:
            _CLASS = _build_vllm_class()
        return _CLASS
    raise AttributeError(name)


def register() -> None:
    """Register ``vllm_bf`` with lm-eval's model registry (lazily: nothing heavy is imported)."""
    import lm_eval.models  # noqa: F401  (registers the built-in models first; the registry skips that once non-empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="evals.budget:VLLMBudgetForcing")
