"""The amortized task guide: an inference network maps a task's support set to its starting factors.

For task i with support set S_i and every adapted module m (factor keys k = ``<m>:<kind>``):

    e_i     = (1/|S_i|) Σ_{x∈S_i} meanpool_{t∈gold(x)} h_L(x)_t   frozen LM, adapters off, no grad [H]
    c_i     = tanh(W_1 LayerNorm(e_i) + b_1)                                                   [hidden]
    Z_{i,k} = reshape(W_out c_i) / hidden                  zero-initialized output layer       [offset_rank, r]
    λ_i⁰[k] = base.init_task_params(θ)[k] + U_k Z_{i,k}    for B factors ([out, r]; U_k: [out, offset_rank])
    λ_i⁰[k] = base.init_task_params(θ)[k] + Z_{i,k}ᵀ U_k   for A factors ([r, in];  U_k: [offset_rank, in])

``x`` runs over the support examples, each read as prompt + gold option; the pool is over the gold
option's tokens (``pool="option"``, whose states have attended to the prompt) or all tokens
(``pool="all"``). The labels are the evidence, so e_i summarizes the labelled support set. Because W_out starts at zero, λ_i⁰ starts as
θ's copy: the guide starts as the paper's mean-field guide and learns how far to move from it. The
inner loop then refines λ_i⁰ (K > 0) or uses it as is (K = 0: a purely amortized posterior, one LM
pass over the support set, no gradient steps).

λ_i⁰ keeps its autograd history to θ (through the base guide's copy) and to the network, so the
first-order pass-through (:func:`~abmll_pyro.infer.inner.pass_through`) trains both; the network is
an ``nn.Module``, so :meth:`MetaSVI.trainable_parameters` includes its parameters.

The 1/hidden factor keeps the start's pace under Adam (which moves every weight of W_out by about the
outer learning rate per step, so Z by up to hidden × that) near the pace of θ's own factors: without
it the encoder's first steps throw the start far from θ and meta-training diverges on held-out tasks.

The offsets have rank ≤ ``offset_rank`` in factor space and rank ≤ r in weight space, and cost
``hidden · n_factors · offset_rank · r`` output weights plus the bases U_k; they never form ΔW.
References: ABML (Ravi & Beatson, ICLR 2019) for the shared-initialization amortization the paper uses;
VERSA (Gordon et al., ICLR 2019) and neural processes for set-encoder inference networks.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..data.scoring import OptionBatch, TokenBatch
from ..lora.adapter import FACTOR_KINDS, BayesLoRA
from ..models.likelihoods import TaskData
from .base import Params, TaskGuide
from .mean_field import MeanFieldGuide

__all__ = ["AmortizedGuide", "support_embedding"]

Embed = Callable[[BayesLoRA, TaskData], Tensor]


def _gold_rows(batch: OptionBatch) -> Tensor:
    """The rows (prompt + gold option) of every example, ``[n]`` row indices."""
    return (batch.row_option == batch.gold[batch.row_example]).nonzero().squeeze(-1)


@torch.no_grad()
def support_embedding(adapter: BayesLoRA, support: TaskData, pool: str = "all", chunk_size: int = 32) -> Tensor:
    """``[H]`` float32: the final hidden states of the frozen LM (adapters off), mean-pooled over each
    support example's prompt + gold-option tokens (``pool="all"``) or its gold-option tokens alone
    (``pool="option"``; a token batch: its target tokens), then averaged over the examples."""
    if pool not in ("all", "option"):
        raise ValueError(f"pool must be 'all' or 'option', got {pool!r}")
    batch = support.batch
    if isinstance(batch, OptionBatch):
        rows = _gold_rows(batch)
        ids, att, tgt = batch.input_ids[rows], batch.attention_mask[rows], batch.target_mask[rows]
    elif isinstance(batch, TokenBatch):
        ids, att, tgt = batch.input_ids, batch.attention_mask, batch.target_mask
    else:
        raise TypeError(f"support_embedding needs an OptionBatch or TokenBatch, got {type(batch).__name__}; "
                        "pass AmortizedGuide(embed=..., embed_dim=...) for other data")
    lm = adapter.lm
    device = next(lm.parameters()).device
    pooled = []
    with adapter.off():
        for start in range(0, ids.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            i, a = ids[part].to(device), att[part].to(device)
            hidden = lm(input_ids=i, attention_mask=a, output_hidden_states=True).hidden_states[-1].float()
            w = (a if pool == "all" else tgt[part].to(device)).unsqueeze(-1).float()  # [n, L, 1] pooling weights
            pooled.append((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))  # [n, H]
    return torch.cat(pooled).mean(0)


def _hidden_size(adapter: BayesLoRA) -> int:
    size = getattr(getattr(adapter.lm, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot read hidden_size from {type(adapter.lm).__name__}'s config; pass embed_dim=")
    return size


class AmortizedGuide(nn.Module, TaskGuide):
    """Support set → starting task factors (see the module docstring); q itself is ``base``'s family.

    Args:
        adapter: the :class:`BayesLoRA` whose factors the network offsets (sizes the output layer).
        hidden: width of the encoder's hidden layer.
        offset_rank: rank of each factor's predicted offset (columns of its basis U_k).
        factors: which factor kinds receive an offset (default the two B factors: B = 0 at θ's init;
            ``mu_B`` alone under a free log-scale map, which has no B_σ).
        base: the task guide that gives q's family and the un-offset start (default mean field).
        pool: ``"option"`` (default: hidden states at the gold option's tokens, which have read the
            prompt through attention) or ``"all"`` (prompt + gold option tokens) for the default
            encoder :func:`support_embedding`. Pooling over the prompt too dilutes the label evidence:
            on the benchmark's ``rule`` family at K = 0, accuracy 0.36 with "all" vs 0.85 with "option".
        embed, embed_dim: a custom support encoder ``embed(adapter, support) -> [embed_dim]`` (no grad
            needed) for data that is not an option or token batch; default :func:`support_embedding`.
    """

    def __init__(self, adapter: BayesLoRA, hidden: int = 64, offset_rank: int = 4,
                 factors: Sequence[str] = ("mu_B", "sigma_B"), base: TaskGuide | None = None,
                 embed: Embed | None = None, embed_dim: int | None = None, pool: str = "option"):
        super().__init__()
        if hidden < 1 or offset_rank < 1:
            raise ValueError(f"hidden and offset_rank must be >= 1, got hidden={hidden!r}, offset_rank={offset_rank!r}")
        if tuple(factors) == ("mu_B", "sigma_B") and "sigma_B" not in adapter.factor_kinds:
            factors = ("mu_B",)  # the default, for a scale map without a low-rank pair (free log-scales)
        offsettable = tuple(k for k in FACTOR_KINDS if k in adapter.factor_kinds)
        unknown = [k for k in factors if k not in offsettable]
        if unknown or not factors:
            raise ValueError(f"factors must be a non-empty subset of {offsettable}, got {tuple(factors)!r}")
        if embed is not None and embed_dim is None:
            raise ValueError("a custom embed needs embed_dim= (the length of the vector it returns)")
        self.base = base or MeanFieldGuide()
        self.embed = embed or functools.partial(support_embedding, pool=pool)
        self.factor_kinds = tuple(factors)
        self.offset_rank = offset_rank
        rank = adapter.config.rank
        dim = embed_dim or _hidden_size(adapter)
        self.encoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Tanh())
        self.bases = nn.ParameterDict()  # U_k, keyed like the task factors
        for m, (out_features, in_features) in adapter.shapes.items():
            for kind in self.factor_kinds:
                shape = (out_features, offset_rank) if kind.endswith("_B") else (offset_rank, in_features)
                self.bases[adapter.key(m, kind)] = nn.Parameter(torch.randn(shape) / math.sqrt(offset_rank))
        self.keys = list(self.bases)
        self.out = nn.Linear(hidden, len(self.keys) * offset_rank * rank)
        nn.init.zeros_(self.out.weight)  # λ⁰ = θ's copy at the start: the mean-field guide
        nn.init.zeros_(self.out.bias)
        self._rank = rank

    def offsets(self, adapter: BayesLoRA, support: TaskData) -> dict[str, Tensor]:
        """The predicted offset of each offset factor (float32, with history to the network)."""
        e = self.embed(adapter, support).detach()
        param = self.out.weight
        codes = self.out(self.encoder(e.to(device=param.device, dtype=param.dtype)))  # [n_keys · offset_rank · r]
        codes = codes.view(len(self.keys), self.offset_rank, self._rank) / self.out.in_features
        result = {}
        for key, z in zip(self.keys, codes):
            u = self.bases[key]
            result[key] = u @ z if key.endswith("_B") else z.transpose(0, 1) @ u  # [out, r] | [r, in]
        return result

    def init_task_params(self, adapter: BayesLoRA, theta_params: Params, support: TaskData | None = None) -> dict[str, Tensor]:
        start = self.base.init_task_params(adapter, theta_params, support)
        if support is None:
            raise ValueError("AmortizedGuide needs the task's support set to compute its start")
        for key, offset in self.offsets(adapter, support).items():
            start[key] = start[key] + offset.to(start[key].dtype)
        return start

    def task_distribution(self, adapter: BayesLoRA, task_params: Params, module: str) -> dist.Distribution:
        return self.base.task_distribution(adapter, task_params, module)

    def extra_repr(self) -> str:
        return f"factors={self.factor_kinds}, offset_rank={self.offset_rank}, base={type(self.base).__name__}"
