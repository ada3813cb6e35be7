"""Frequencies of lmkern.sample against the exact filtered distribution.

One random row of V = 40 logits (two of them -inf) is expanded to N rows with row stride 0 and
drawn with per-row seeds 0..N-1, so memory stays small: N = 10^6 draws per configuration (2*10^4
for Triton in its CPU interpreter). The expected distribution is softmax(z) over the survivors of
the float64 oracle (tests/sampling_helpers.py); the logits are redrawn until no filter boundary is
within 1e-3 of a tie, so rounding cannot move a token across one.

A correct sampler fails each check below with probability < 1e-6 (for independent uniforms):
* Pearson's chi-square over the survivors (cells with expected count < 5 merged) is below
  k + 2 sqrt(k t) + 2 t, t = ln(10^6), k degrees of freedom (Laurent and Massart's chi-square tail bound);
* the total-variation distance is below sqrt(V/N) + 3/sqrt(N) (its mean is at most
  0.4 sqrt(V/N); McDiarmid's inequality bounds the excess by 2.63/sqrt(N) at 1e-6);
* no draw lands on a filtered-out or -inf token (probability 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import oracle

import lmkern

# 10^6 draws x 7 configurations take 30-150 s on the reference alone on a shared 2-core machine:
# marked slow so that `-m "not slow"` skips them while iterating; `make test` and CI run them.
pytestmark = pytest.mark.slow

V = 40
FAIL_PROB = 1e-6
CONFIGS = {
    "none": dict(),
    "top_k": dict(top_k=8),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "all": dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02),
    "T0.5": dict(temperature=0.5),
    "T2": dict(temperature=2.0),
}


def _draws(device, backend) -> int:
    return 20_000 if (backend == "triton" and device == "cpu") else 1_000_000


def _margins_ok(x: torch.Tensor, cfg: dict, margin: float = 1e-3) -> bool:
    """No top-k, top-p or min-p boundary within ``margin`` of flipping."""
    T = cfg.get("temperature", 1.0)
    z = (x.float() / T).double()
    finite = z[torch.isfinite(z)]
    zs = torch.sort(finite, descending=True).values
    k = cfg.get("top_k")
    if k is not None and zs[k - 1] - zs[k] < margin:
        return False
    keep = z >= zs[k - 1] if k is not None else torch.isfinite(z)
    p = cfg.get("top_p")
    if p is not None:
        q = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        cum = torch.cumsum(torch.sort(q, descending=True).values, -1)
        i = int((cum >= p).nonzero()[0, 0])
        if cum[i] - p < margin or (i > 0 and p - cum[i - 1] < margin):
            return False
    m = cfg.get("min_p")
    if m is not None:
        ratio = torch.exp(finite - finite.max())
        if ((ratio - m).abs() < margin * m).any():
            return False
    return True


def _logits(cfg: dict) -> torch.Tensor:
    for _ in range(1000):
        x = torch.randn(V) * 1.5
        x[[3, 17]] = float("-inf")
        if _margins_ok(x, cfg):
            return x
    raise AssertionError("could not draw logits away from filter boundaries")


def _chi2_threshold(k: int) -> float:
    t = math.log(1 / FAIL_PROB)
    return k + 2 * math.sqrt(k * t) + 2 * t


def _pearson(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over cells with expected > 0, merging the smallest until each has >= 5."""
    e, c = expected.tolist(), counts.tolist()
    cells = sorted((ei, ci) for ei, ci in zip(e, c) if ei > 0)
    merged, acc_e, acc_c = [], 0.0, 0.0
    for ei, ci in cells:
        acc_e, acc_c = acc_e + ei, acc_c + ci
        if acc_e >= 5:
            merged.append((acc_e, acc_c))
            acc_e, acc_c = 0.0, 0.0
    if acc_e > 0:  # leftovers join the last (largest) cell
        last_e, last_c = merged.pop() if merged else (0.0, 0.0)
        merged.append((last_e + acc_e, last_c + acc_c))
    stat = sum((ci - ei) ** 2 / ei for ei, ci in merged)
    return stat, len(merged) - 1


@pytest.mark.parametrize("config", list(CONFIGS))
def test_frequencies_match_the_filtered_distribution(device_backend, config):
    device, backend = device_backend
    cfg = CONFIGS[config]
    N = _draws(device, backend)
    x = _logits(cfg)
    want = oracle(x[None], **cfg)
    T = cfg.get("temperature", 1.0)
    z = (x.float() / T).double().masked_fill(~want.keep[0], float("-inf"))
    probs = torch.softmax(z, -1)
    row = x.to(device)
    counts = torch.zeros(V, dtype=torch.int64)
    chunk = 1 << 12  # small chunks: the sort-based reference is fastest on cache-sized pieces
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        seeds = torch.arange(start, start + n, device=device)
        ids = lmkern.sample(row.expand(n, V), **cfg, seed=seeds, backend=backend)
        counts += torch.bincount(ids.cpu(), minlength=V)
    assert counts.sum() == N
    outside = counts[probs == 0]
    assert outside.sum() == 0, f"{config}: {int(outside.sum())} draws of filtered-out tokens {(counts * (probs == 0)).nonzero().flatten().tolist()}"
    expected = probs * N
    stat, dof = _pearson(counts, expected)
    tv = 0.5 * (counts.double() / N - probs).abs().sum().item()
    tv_bound = math.sqrt(V / N) + 3 / math.sqrt(N)
    detail = f"{config} ({backend}, N={N}): chi2 {stat:.1f} (dof {dof}, bound {_chi2_threshold(dof):.1f}), TV {tv:.2e} (bound {tv_bound:.2e})"
    if dof > 0:
        assert stat < _chi2_threshold(dof), detail
    assert tv < tv_bound, detail


def test_the_checks_detect_a_slightly_wrong_distribution():
    # counts drawn (by torch) from temperature 1.1 instead of 1 must fail the chi-square bound
    x = _logits({})
    probs = torch.softmax(x.double(), -1)
    wrong = torch.softmax(x.double() / 1.1, -1)
    N = 1_000_000
    counts = torch.bincount(torch.multinomial(wrong.float(), N, replacement=True), minlength=V)
    stat, dof = _pearson(counts, probs * N)
    assert stat > _chi2_threshold(dof)
    right = torch.bincount(torch.multinomial(probs.float(), N, replacement=True), minlength=V)
    stat, dof = _pearson(right, probs * N)
    assert stat < _chi2_threshold(dof)
