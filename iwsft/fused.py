"""Fused output projection + per-token log-probs that never holds the vocabulary-sized logits.

iw-SFT needs only ``log p_θ(y_bt)`` per label token (for the loss and, detached, for ``log q``). The usual path
materialises the logits ``[N, V]`` (N = B·T tokens, V = vocabulary) and autograd keeps each chunk's fp32
log-softmax for the backward: at N = 22,000 and V = 152,064 that is ≈ 6.7 GB of bf16 logits plus ≈ 13 GB of
fp32 log-softmax. Here the projection and the log-softmax run chunk by chunk over the label tokens only:

    forward,  per chunk c of label rows:  z = h_c W^T (input dtype, then fp32)      # [n_c, V], freed after the chunk
                                          lse_c = logsumexp(z),  logp_c = z[y_c] − lse_c
    backward, per chunk (z recomputed):   G = g_c ⊙ (onehot(y_c) − exp(z − lse_c))   # d logp / d z
                                          grad_h_c = G W,   grad_W += G^T h_c

Saved for the backward: the hidden states (already alive: the matmul of the usual path saves them too), a reference
to the weight, the label positions and targets, and one fp32 ``lse`` per label token. Peak extra memory is one
``[chunk_size, V]`` fp32 block (plus its input-dtype copy in bf16) instead of the whole ``[N, V]`` twice; the
price is one more ``[n, d] × [d, V]`` matmul (the recompute). Positions whose label is ``ignore_index`` get
log-prob 0 and cost nothing (no logits are computed for them), as in ``F.cross_entropy(ignore_index=...)``.

Model integration (:class:`FusedOutputHead`): the head patches the forward of the module that applies the output
weight (``model.output`` — an ``nn.Linear`` — or, for tied embeddings, the parameter-free ``linear`` module inside
torchtune's ``TiedLinear``) so that, while labels are set, that forward returns the per-token log-probs
``[B, T]`` instead of logits. The fused op therefore runs *inside* the output module's own forward: under FSDP2
the weight is the unsharded parameter that FSDP gathered for that forward (once per model forward, whether the
output belongs to the root unit or is sharded on its own), its gradient flows to that parameter and FSDP's
reduce-scatter runs as for a plain ``nn.Linear``; the module tree and the state-dict keys do not change.
The model must call its output module once on the whole ``[B, T, d]`` hidden states (torchtune:
``model.set_num_output_chunks(0)``; the head checks the shape).

Plain PyTorch (no torchtune import). Optional CUDA kernel: ``backend="cce"`` uses Apple's ``cut-cross-entropy``
(``linear_cross_entropy(..., reduction="none", filter_eps=None)``: exact per-token values, no gradient filtering)
when the package is installed and the tensors are on CUDA; untested here (no GPU in CI).
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
from torch import nn

BACKENDS = ("torch", "cce")
DEFAULT_CHUNK_SIZE = 1024  # label tokens per chunk: 1024 x 152,064 x 4 B = 0.62 GB of fp32 logits at a time


class _FusedLinearLogProb(torch.autograd.Function):
    """``logp[i] = (h W^T)[i, y_i] − logsumexp_v (h W^T)[i, v]`` for the rows ``rows``; recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, rows, targets, chunk_size):
        # hidden2d [N, d], weight [V, d], rows [n] long (label positions), targets [n] long in [0, V)
        n = rows.numel()
        logp = torch.zeros(hidden2d.shape[0], dtype=torch.float32, device=hidden2d.device)  # [N]
        lse = torch.empty(n, dtype=torch.float32, device=hidden2d.device)  # [n]
        for s in range(0, n, chunk_size):
            r, y = rows[s:s + chunk_size], targets[s:s + chunk_size]
            z = _chunk_logits(hidden2d, weight, r)  # [c, V] fp32, owned by us: modified in place below
            picked = z.gather(1, y.unsqueeze(1)).squeeze(1)  # [c]
            lse_c = _logsumexp_(z)  # destroys z (in place) to avoid a second [c, V] temporary
            lse[s:s + chunk_size] = lse_c
            logp[r] = picked - lse_c
            del z
        ctx.save_for_backward(hidden2d, weight, rows, targets, lse)
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden2d, weight, rows, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden2d) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        g = grad_logp.float()[rows]  # [n]: upstream gradient of each label token's log-prob
        cs = ctx.chunk_size
        for s in range(0, rows.numel(), cs):
            r, y, g_c = rows[s:s + cs], targets[s:s + cs], g[s:s + cs]
            z = _chunk_logits(hidden2d, weight, r)  # recompute [c, V] fp32
            # G = g · (onehot − softmax) = −g · exp(z − lse) + g at the target, all in place on z
            p = z.sub_(lse[s:s + cs].unsqueeze(1)).exp_().mul_(-g_c.unsqueeze(1))
            p.scatter_add_(1, y.unsqueeze(1), g_c.unsqueeze(1))
            G = p.to(hidden2d.dtype)  # as autograd would: the logits' gradient in the matmul's dtype
            del z, p
            if need_h:
                grad_h[r] = G @ weight  # rows are unique: plain assignment
            if need_w:
                grad_w.addmm_(G.t(), hidden2d.index_select(0, r))
            del G
        return grad_h, grad_w, None, None, None


def _chunk_logits(hidden2d: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(h[rows] W^T)`` in the input dtype (as ``F.linear`` in the model), then fp32: ``[c, V]``."""
    z = hidden2d.index_select(0, rows) @ weight.t()
    return z if z.dtype == torch.float32 else z.float()


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """Row-wise ``logsumexp`` of a 2-D fp32 tensor, computed in place (``z`` is overwritten): ``[c]``."""
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf stays -inf, never NaN
    return z.sub_(m).exp_().sum(dim=1).log_().add_(m.squeeze(1))


def fused_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          backend: str = "torch") -> torch.Tensor:
    """``log softmax(hidden @ weight.T)[..., labels]`` → ``[B, T]`` fp32, 0 where ``labels == ignore_index``.

    Args:
        hidden: final hidden states ``[B, T, d]`` (after the final norm), any float dtype.
        weight: output projection ``[V, d]`` (tied or not; no bias), same dtype as ``hidden``.
        labels: ``[B, T]`` long, already aligned with ``hidden`` (next-token shift done by the caller).
        ignore_index: label value that carries no loss.
        chunk_size: label tokens per chunk; memory is ``chunk_size × V`` fp32 at a time.
        backend: ``"torch"`` (this module's chunked autograd function, any device) or ``"cce"``
            (``cut_cross_entropy.linear_cross_entropy`` on CUDA, optional).

    Returns the same values (and gradients w.r.t. ``hidden`` and ``weight``) as
    ``iwsft.token_log_probs(hidden @ weight.T, labels)`` up to fp rounding. Raises ``ValueError`` for mismatched
    shapes, labels outside ``[0, V)`` (other than ``ignore_index``), ``chunk_size < 1`` or an unknown backend;
    ``ImportError``/``ValueError`` for ``backend="cce"`` without the package or off CUDA.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, d] and labels [B, T]; got hidden {tuple(hidden.shape)}, labels "
                         f"{tuple(labels.shape)}. With torchtune call model.set_num_output_chunks(0) so the output "
                         "module sees the whole sequence.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, d={hidden.shape[-1]}], got {tuple(weight.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"loss.fused_chunk_size={chunk_size} must be >= 1.")
    if backend not in BACKENDS:
        raise ValueError(f"loss.fused_backend={backend!r}: use one of {BACKENDS}.")
    B, T, d = hidden.shape
    V = weight.shape[0]
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= V))
    if bool(bad.any()):
        raise ValueError(f"labels hold ids outside [0, {V}) (e.g. {int(flat[bad][0])}): the tokenizer and the "
                         f"model's vocabulary (output rows {V}) do not match.")
    if backend == "cce":
        return _cce_token_log_probs(hidden, weight, labels, ignore_index)
    rows = valid.nonzero().squeeze(1)  # [n]
    targets = flat.index_select(0, rows)
    out = _FusedLinearLogProb.apply(hidden.reshape(B * T, d), weight, rows, targets, int(chunk_size))
    return out.view(B, T)


def _cce_token_log_probs(hidden, weight, labels, ignore_index):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise ImportError("loss.fused_backend=cce needs the optional package cut-cross-entropy "
                          "(pip install cut-cross-entropy; CUDA + triton), or use loss.fused_backend=torch.") from exc
    if hidden.device.type != "cuda":
        raise ValueError("loss.fused_backend=cce runs on CUDA only; use loss.fused_backend=torch on CPU.")
    # reduction="none": per-token loss, 0 at ignore_index; filter_eps=None: no gradient filtering (exact backward).
    nll = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none",
                               filter_eps=None)
    return -nll.float().view(labels.shape)


def _is_tied_linear(output) -> bool:
    """torchtune's ``TiedLinear`` (not an ``nn.Module``): ``tied_module.weight`` applied by its ``linear`` module."""
    return (not isinstance(output, nn.Module) and hasattr(output, "tied_module")
            and isinstance(getattr(output, "linear", None), nn.Module))


class FusedOutputHead:
    """Turns a decoder's output projection into a per-token log-prob head while labels are set.

    ``head = FusedOutputHead(model)`` patches the forward of the module that applies ``model.output``'s weight
    (an ``nn.Linear``-like module with ``.weight [V, d]`` and no bias, or torchtune's ``TiedLinear``); outside
    :meth:`log_probs` the model is unchanged (logits as before). Then::

        logp = head.log_probs(tokens, labels)     # = model(tokens) with the fused head → [B, T] fp32

    The model must call its output module once per forward on the whole ``[B, T, d]`` hidden states
    (torchtune: ``model.set_num_output_chunks(0)``). ``log_probs`` raises ``RuntimeError`` if the output module
    was not called exactly once or the result is not ``[B, T]``.

    Raises ``ValueError`` at construction for an output module it cannot fuse exactly: a bias, LoRA/DoRA on the
    output projection (``lora_a``/``magnitude``), or a quantised (NF4) base weight.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = -100,
                 backend: str = "torch"):
        if chunk_size < 1:
            raise ValueError(f"loss.fused_chunk_size={chunk_size} must be >= 1.")
        if backend not in BACKENDS:
            raise ValueError(f"loss.fused_backend={backend!r}: use one of {BACKENDS}.")
        output = getattr(model, "output", None)
        self.model = model
        self.chunk_size = int(chunk_size)
        self.ignore_index = ignore_index
        self.backend = backend
        self._labels: Optional[torch.Tensor] = None
        self._calls = 0
        if _is_tied_linear(output):
            target = output.linear  # forward(x, weight): weight = tied_module.weight, fetched by TiedLinear
            get_weight = None
        elif isinstance(output, nn.Module) and isinstance(getattr(output, "weight", None), torch.Tensor):
            if hasattr(output, "lora_a") or hasattr(output, "magnitude"):
                raise ValueError("loss.fused=true does not support LoRA/DoRA on the output projection "
                                 "(model.apply_lora_to_output=true): set apply_lora_to_output=false or loss.fused=false.")
            if getattr(output, "bias", None) is not None:
                raise ValueError("loss.fused=true needs an output projection without bias; set loss.fused=false.")
            if getattr(output, "_quantize_base", False):
                raise ValueError("loss.fused=true does not support a quantised (NF4) output projection; "
                                 "set loss.fused=false.")
            target = output
            get_weight = output  # read .weight inside the forward: the unsharded parameter under FSDP2
        else:
            raise ValueError(f"loss.fused=true: model.output is a {type(output).__name__}; expected an nn.Linear "
                             "without bias or torchtune's TiedLinear. Set loss.fused=false.")
        if getattr(target, "_iwsft_fused_head", None) is not None:
            raise ValueError("this model's output projection already has a FusedOutputHead.")
        original = target.forward
        head = self

        def forward(mod, x, *args, **kwargs):
            if head._labels is None:
                return original(x, *args, **kwargs)
            weight = args[0] if get_weight is None else get_weight.weight
            head._calls += 1
            return fused_token_log_probs(x, weight, head._labels, head.ignore_index, head.chunk_size,
                                         head.backend)

        # An instance attribute shadows the class's forward; nn.Module.__call__ (and FSDP2's pre/post-forward
        # hooks around it) stay in place.
        target.forward = types.MethodType(forward, target)
        target._iwsft_fused_head = self
        self._target = target

    @contextlib.contextmanager
    def labels(self, labels: torch.Tensor):
        """While active, the output module returns ``[B, T]`` fp32 log-probs of ``labels``."""
        self._labels, self._calls = labels, 0
        try:
            yield self
        finally:
            self._labels = None

    def log_probs(self, tokens: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``model(tokens)`` through the fused head → ``[B, T]`` fp32 log-probs (0 at ``ignore_index``)."""
        with self.labels(labels):
            out = self.model(tokens, **model_kwargs)
            calls = self._calls
        if calls != 1 or not isinstance(out, torch.Tensor) or out.shape != labels.shape:
            raise RuntimeError(f"fused output head: the output module ran {calls} time(s) and the model returned "
                               f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}; expected one call and "
                               f"[B, T]={tuple(labels.shape)} (torchtune: model.set_num_output_chunks(0)).")
        return out.float()
