"""Sort-based, exact sampling from logits: the truth for tests and the last-resort backend.

This module *is* the specification every backend (C++ CPU, CUDA, Triton) implements; the op
contract is ``lmkern::sample`` / ``lmkern::softmax`` in csrc/registration.cpp.

Per row r of (B, V) logits, with per-row parameters T, k, p, m and the row's seed:

1. ``T == 0``: greedy. The id is the first index of the largest logit; no randomness, no filters.
   So is a row whose largest logit over T overflows float32 (``|x_max / T| = inf``, a tiny T or
   huge logits): the limit T -> 0 is then reached numerically, every other token's
   ``exp((x - x_max) / T)`` being exactly 0, while ``x / T`` would tie every overflowing token
   at +inf (csrc/include/lmkern/sampling_math.h, ``greedy_row``).
2. ``z = logits.float() / T``. Filters, in Hugging Face's order, each on what the previous left:
   * top-k (``0 < k < V``): keep ``z >= t_k``, t_k the k-th largest z counting repeats (ties with
     the k-th are all kept, exactly as transformers' TopKLogitsWarper).
   * top-p (``p < 1``): q = softmax of the survivors. Keep ``z >= t_p``, where t_p is the z of the
     first token, in descending order, at which the inclusive cumulative q reaches p (the smallest
     set of most likely tokens holding mass >= p, transformers' TopPLogitsWarper; tokens tied with
     the last one kept are all kept).
   * min-p (``m > 0``): keep ``exp(z - z_max) >= m`` (transformers' MinPLogitsWarper: q < m * q_max
     is removed). The most likely token always survives every filter.
3. The draw, an exponential race over the survivors (equivalently Gumbel-max): the id is the
   survivor with the largest ``z_i - log(-log(u_i))``, first index on ties, where
   ``u_i = uniform_open01(philox(seed_r, counter=(i, stream_r)))`` (csrc/include/lmkern/philox.h:
   stream_r = r for a scalar seed, 0 for per-row seeds). Its probability of picking i is exactly
   ``softmax(z)[i]`` over the survivors, and the same seed gives the same id on every backend up to
   the rounding of exp/log.
4. ``logprob`` = ``log_softmax(logits.float())[id]``: the unfiltered, temperature-1 distribution.

Invalid rows: a row with a NaN or +inf logit, or with no finite logit, has no defined draw; the op
returns id -1 for it (and logprob NaN), and ``lmkern.sample`` raises ValueError naming the row.
``-inf`` logits are valid and never drawn.

The random words are computed with 64-bit integer tensor arithmetic (torch has no uint32 multiply
with a high half), bit-identical to the C++ and Triton versions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def philox_first_word(seed: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    """Philox4x32-10's first output word at counter (c0, c1, 0, 0) under 64-bit keys ``seed``.

    All arguments are int64 tensors that broadcast; c0/c1 hold values in [0, 2^32). Returns int64
    in [0, 2^32). Products of two 32-bit values wrap in int64 but keep their bit pattern, so the
    masked shifts below recover the exact high and low halves.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = c0 & _MASK32
    c1 = c1 & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        p0 = c0 * _ROUND_A
        p2 = c2 * _ROUND_B
        n0 = ((p2 >> 32) & _MASK32) ^ c1 ^ k0
        n2 = ((p0 >> 32) & _MASK32) ^ c3 ^ k1
        c1 = p2 & _MASK32
        c3 = p0 & _MASK32
        c0, c2 = n0, n2
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def uniform_open01(bits: Tensor) -> Tensor:
    """float32 uniforms strictly inside (0, 1) from 32-bit words: (2 * (bits >> 9) + 1) / 2^24."""
    return ((((bits >> 9) << 1) | 1).to(torch.float32)) * (2.0**-24)


def race_keys(z: Tensor, seeds: Tensor, streams: Tensor) -> Tensor:
    """The exponential-race keys ``z - log(-log(u))`` of a (B, V) fp32 tensor z; seeds/streams (B,)."""
    idx = torch.arange(z.shape[-1], device=z.device, dtype=torch.int64)
    u = uniform_open01(philox_first_word(seeds[:, None], idx[None, :], streams[:, None]))
    return z - torch.log(-torch.log(u))


def _per_row(value, tensor: Optional[Tensor], B: int, dtype: torch.dtype, device) -> Tensor:
    if tensor is not None:
        return tensor.to(device=device, dtype=dtype).reshape(B)
    return torch.full((B,), value, dtype=dtype, device=device)


def survivors(z: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Boolean (B, V) mask of the tokens the filters keep, computed by sorting (see module doc).

    z: (B, V) fp32 temperature-scaled logits with a finite maximum per row; top_k (B,) int64,
    top_p / min_p (B,) fp32.
    """
    B, V = z.shape
    keep = torch.ones_like(z, dtype=torch.bool)
    # top-k: keep z >= the k-th largest (k <= 0 or k >= V: no filter)
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    k_active = (top_k > 0) & (top_k < V)
    kth = sorted_z.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    keep &= ~k_active[:, None] | (z >= kth)
    # top-p over the top-k survivors
    zk = z.masked_fill(~keep, float("-inf"))
    q_sorted, _ = torch.sort(torch.softmax(zk, dim=-1), dim=-1, descending=True)
    zk_sorted, _ = torch.sort(zk, dim=-1, descending=True)
    cum = torch.cumsum(q_sorted, dim=-1)
    # first position whose inclusive cumulative mass reaches p (the last one if rounding keeps
    # the total just under p)
    reach = cum >= top_p[:, None]
    first = torch.where(reach.any(-1), reach.float().argmax(-1), torch.full_like(top_k, V - 1))
    t_p = zk_sorted.gather(1, first[:, None])
    p_active = top_p < 1.0
    keep &= ~p_active[:, None] | (z >= t_p)
    # min-p relative to the most likely token
    z_max = z.max(dim=-1, keepdim=True).values
    m_active = min_p > 0
    keep &= ~m_active[:, None] | (torch.exp(z - z_max) >= min_p[:, None])
    return keep


def greedy_rows(x_max: Tensor, T: Tensor) -> Tensor:
    """(B,) bool: the row takes the limit T -> 0 (its first argmax): T == 0, or a finite x_max
    over T overflows float32 (see the module doc, step 1)."""
    overflows = (T > 0) & torch.isfinite(x_max) & ~torch.isfinite(x_max / torch.where(T > 0, T, 1.0))
    return (T == 0) | overflows


def valid_rows(logits: Tensor) -> Tensor:
    """(B,) bool: the row has no NaN, no +inf and at least one finite logit."""
    x = logits.float()
    return ~torch.isnan(x).any(-1) & ~(x == float("inf")).any(-1) & torch.isfinite(x).any(-1)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    temperatures: Optional[Tensor] = None,
    top_ks: Optional[Tensor] = None,
    top_ps: Optional[Tensor] = None,
    min_ps: Optional[Tensor] = None,
    seed: int = 0,
    seeds: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(ids int64 (B,), logprobs fp32 (B,)) for (B, V) logits; the op contract, see module doc.

    A per-row tensor (``temperatures`` ...) replaces its scalar. ``seeds`` (B,) int64 replaces
    ``seed`` (then each row's stream is 0, else the row index).
    """
    B, V = logits.shape
    dev = logits.device
    x = logits.float()
    T = _per_row(temperature, temperatures, B, torch.float32, dev)
    k = _per_row(top_k, top_ks, B, torch.int64, dev)
    p = _per_row(top_p, top_ps, B, torch.float32, dev)
    m = _per_row(min_p, min_ps, B, torch.float32, dev)
    if seeds is not None:
        seed_r = seeds.to(device=dev, dtype=torch.int64).reshape(B)
        stream = torch.zeros(B, dtype=torch.int64, device=dev)
    else:
        s = int(seed) & 0xFFFFFFFFFFFFFFFF
        s = s - (1 << 64) if s >= (1 << 63) else s  # the same 64 bits as an int64
        seed_r = torch.full((B,), s, dtype=torch.int64, device=dev)
        stream = torch.arange(B, dtype=torch.int64, device=dev)
    ok = valid_rows(x)
    safe = torch.where(ok[:, None], x, torch.zeros_like(x))  # keeps the math below NaN-free
    greedy = greedy_rows(safe.max(-1).values, T)
    z = safe / torch.where(greedy, torch.ones_like(T), T)[:, None]
    keep = survivors(z, k, p, m)
    keys = race_keys(z, seed_r, stream).masked_fill(~keep, float("-inf"))
    drawn = keys.argmax(-1)  # argmax returns the first maximal index
    ids = torch.where(greedy, safe.argmax(-1), drawn)
    logprobs = torch.log_softmax(safe, dim=-1).gather(1, ids[:, None]).squeeze(1)
    ids = torch.where(ok, ids, torch.full_like(ids, -1))
    logprobs = torch.where(ok, logprobs, torch.full_like(logprobs, float("nan")))
    return ids, logprobs


def softmax(logits: Tensor, temperature: float = 1.0, temperatures: Optional[Tensor] = None) -> Tensor:
    """fp32 softmax of ``logits / T`` over the last dim; T == 0 gives one-hot at the first argmax,
    and so does a row without NaN or +inf whose largest logit over T overflows (the limit T -> 0,
    as in ``sample``; ``logits / T`` would give a NaN row). ``temperatures`` has the leading shape
    of logits (one T per row)."""
    x = logits.float()
    lead = x.shape[:-1]
    T = (
        temperatures.to(device=x.device, dtype=torch.float32).reshape(lead)
        if temperatures is not None
        else torch.full(lead, float(temperature), device=x.device)
    )
    greedy = greedy_rows(x.max(-1).values, T)[..., None]  # a NaN max is not finite: NaN row
    probs = torch.softmax(x / torch.where(greedy, torch.ones_like(greedy, dtype=x.dtype), T[..., None]), dim=-1)
    onehot = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, onehot, probs)
