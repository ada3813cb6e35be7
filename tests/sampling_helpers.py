"""An independent float64 oracle for lmkern.sample, used by the sampling tests.

It follows the specification (lmkern/reference/sampling.py) but computes every probability,
cumulative sum and race key in float64 from the same fp32 ``z = logits.float() / T``, so it
checks the reference as much as the kernels. Only the Philox words come from the reference;
tests/test_sampling.py checks them against the published Philox4x32-10 answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lmkern.reference import sampling as reference

U64 = 1 << 64


def as_int64(seed: int) -> int:
    """The int64 with the same 64 bits as ``seed mod 2**64`` (what the op receives)."""
    s = seed % U64
    return s - U64 if s >= 1 << 63 else s


def rows(value, B: int, dtype) -> Tensor:
    """A per-row parameter as a (B,) CPU tensor (None: the disabled value)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", dtype).reshape(-1).expand(B).clone()
    return torch.full((B,), value, dtype=dtype)


@dataclass
class Oracle:
    ids: Tensor  # (B,) int64; -1 for an invalid row
    keep: Tensor  # (B, V) survivors as specified
    loose: Tensor  # (B, V) survivors with slightly looser top-p/min-p, for rounding at boundaries
    log_softmax: Tensor  # (B, V) float64 log_softmax(logits), temperature 1, unfiltered
    log_softmax32: Tensor  # (B, V) torch's own float32 log_softmax: its rounding sets the tolerance


def _survivors(z: Tensor, k: Tensor, p: Tensor, m: Tensor) -> Tensor:
    B, V = z.shape
    keep = torch.ones_like(z, dtype=torch.bool)
    zs = torch.sort(z, dim=-1, descending=True).values
    kth = zs.gather(1, (k.clamp(1, V) - 1)[:, None])
    keep &= ~((k > 0) & (k < V))[:, None] | (z >= kth)
    zk = z.masked_fill(~keep, float("-inf"))
    q = torch.softmax(zk, dim=-1)
    qs, order = torch.sort(q, dim=-1, descending=True)
    cum = torch.cumsum(qs, dim=-1)
    reach = cum >= p[:, None]
    first = torch.where(reach.any(-1), reach.to(torch.int64).argmax(-1), keep.sum(-1) - 1)
    t_p = zk.gather(1, order.gather(1, first[:, None]))
    keep &= ~(p < 1)[:, None] | (z >= t_p)
    zmax = z.max(-1, keepdim=True).values
    keep &= ~(m > 0)[:, None] | (torch.exp(z - zmax) >= m[:, None])
    return keep


def oracle(logits: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=0, seeds: Optional[Tensor] = None) -> Oracle:
    """What lmkern.sample must return (up to rounding at filter boundaries and race near-ties)."""
    x = logits.detach().to("cpu", torch.float32)
    B, V = x.shape
    T = rows(temperature, B, torch.float32)
    k = rows(0 if top_k is None else top_k, B, torch.int64)
    p = rows(1.0 if top_p is None else top_p, B, torch.float64)
    m = rows(0.0 if min_p is None else min_p, B, torch.float64)
    valid = ~torch.isnan(x).any(-1) & ~(x == float("inf")).any(-1) & torch.isfinite(x).any(-1)
    x = torch.where(valid[:, None], x, torch.zeros_like(x))
    greedy = T == 0
    z = (x / torch.where(greedy, torch.ones_like(T), T)[:, None]).double()  # the spec's fp32 z
    keep = _survivors(z, k, p, m)
    loose = _survivors(z, k, (p + 2e-5).clamp(max=1.0), m * (1 - 1e-4))
    keep[greedy] = False
    keep[greedy, x[greedy].argmax(-1)] = True
    loose |= keep
    loose[greedy] = keep[greedy]
    if seeds is not None:
        key = seeds.detach().to("cpu", torch.int64).reshape(B)
        stream = torch.zeros(B, dtype=torch.int64)
    else:
        key = torch.full((B,), as_int64(seed), dtype=torch.int64)
        stream = torch.arange(B, dtype=torch.int64)
    idx = torch.arange(V, dtype=torch.int64)
    u = reference.uniform_open01(reference.philox_first_word(key[:, None], idx[None, :], stream[:, None])).double()
    race = (z - torch.log(-torch.log(u))).masked_fill(~keep, float("-inf"))
    ids = torch.where(greedy, x.argmax(-1), race.argmax(-1))
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    return Oracle(ids, keep, loose, torch.log_softmax(x.double(), -1), torch.log_softmax(x, -1))


def check_against_oracle(ids: Tensor, logprobs: Optional[Tensor], want: Oracle, what: str) -> int:
    """Every id is a (loose) survivor; logprobs match; returns the number of rows whose id differs
    from the oracle's (the caller bounds it: rounding may flip rare near-ties)."""
    ids = ids.cpu()
    B = ids.shape[0]
    assert ids.dtype == torch.int64 and ids.shape == (B,), f"{what}: ids {ids.dtype} {tuple(ids.shape)}"
    assert bool(((ids >= 0) & (ids < want.keep.shape[1])).all()), f"{what}: ids out of range: {ids.tolist()[:20]}"
    inside = want.loose.gather(1, ids[:, None]).squeeze(1)
    bad = (~inside).nonzero().flatten().tolist()
    assert not bad, f"{what}: rows {bad[:10]} drew filtered-out tokens {ids[bad[:10]].tolist()}"
    if logprobs is not None:
        assert logprobs.dtype == torch.float32 and logprobs.shape == (B,), f"{what}: logprobs {logprobs.dtype} {tuple(logprobs.shape)}"
        # Within 1e-5 (abs and rel) of float64, or twice torch's own float32 error plus that: a
        # float32 sum over a long vocabulary can itself be off by 2e-5 (V = 50257).
        expect = want.log_softmax.gather(1, ids[:, None]).squeeze(1)
        torch_err = (want.log_softmax32.gather(1, ids[:, None]).squeeze(1).double() - expect).abs()
        err = (logprobs.cpu().double() - expect).abs()
        bound = 2 * torch_err + 1e-5 + 1e-5 * expect.abs()
        assert bool((err <= bound).all()), f"{what}: logprobs off by {err.max().item():.3g} (bound {bound[err.argmax()].item():.3g})"
    return int((ids != want.ids).sum())


def allowed_mismatches(B: int) -> int:
    """At most 0.1% of rows (rounded up) may differ from the oracle / reference."""
    return -(-B // 1000)
