"""The Triton sampling kernels' tile shapes, which the backend-parametrized suite (test_sampling.py)
cannot reach on the interpreter: its tiles there hold whole rows up to V = 65536. Shrinking the
tiles makes every row span several tiles (and several rows share one), so the looped passes, the
tile-skipping race and the multi-level threshold search all run on small inputs."""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import allowed_mismatches, check_against_oracle, oracle

import lmkern
from lmkern.ops import sampling as sampling_ops

pytestmark = pytest.mark.skipif(sampling_ops.triton_sampling is None, reason="no Triton sampling backend here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# (tile elements, B, V): rows looped over 5 tiles (BLOCK_B = 1), and short rows batched two per
# tile (BLOCK_B = 2). The interpreter pays per tile step, so the batches stay small.
SHAPES = {"looped": (64, 12, 300), "batched": (256, 48, 100)}


@pytest.fixture
def tiles(monkeypatch):
    def set_tile(elements: int) -> None:
        monkeypatch.setattr(sampling_ops.triton_sampling, "SAMPLE_TILE", elements)
        monkeypatch.setattr(sampling_ops.triton_sampling, "SAMPLE_BATCH_TILE", elements)
        monkeypatch.setattr(sampling_ops.triton_sampling, "SOFTMAX_TILE", elements)

    return set_tile


CONFIGS = {
    "plain": dict(),
    "top_k": dict(top_k=7),
    "top_k_large": dict(top_k=90),
    "top_p": dict(temperature=1.5, top_p=0.7),
    "min_p": dict(min_p=0.05),
    "all": dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_small_tiles_match_oracle_and_reference(tiles, shape, config):
    tile, B, V = SHAPES[shape]
    tiles(tile)
    x = torch.randn(B, V, device=DEVICE) * 3
    x[::5, ::3] = float("-inf")  # -inf logits in some rows, never drawn
    cfg = CONFIGS[config]
    ids, logprobs = lmkern.sample(x, **cfg, seed=1234, return_logprobs=True, backend="triton")
    bad = check_against_oracle(ids, logprobs, oracle(x, **cfg, seed=1234), f"{shape} {config}")
    assert bad <= allowed_mismatches(B)
    ref = lmkern.sample(x, **cfg, seed=1234, backend="reference")
    assert int((ids != ref).sum()) <= allowed_mismatches(B)


def _op(x, temperatures, top_ks=None, seeds=None):
    """The Triton op itself: an invalid row gives id -1 (lmkern.sample raises for it)."""
    return torch.ops.lmkern.sample_triton(x, 1.0, 0, 1.0, 0.0, temperatures, top_ks, None, None, 0, seeds, True)


def test_looped_tiles_ties_greedy_and_invalid_rows(tiles):
    tiles(64)
    V = 300
    x = torch.randn(6, V, device=DEVICE)
    x[0, [17, 150, 299]] = 9.0  # greedy: first of three maxima in different tiles
    x[1, 250] = float("nan")  # invalid rows, the bad value late in the row: NaN, +inf, no finite logit
    x[2, 260] = float("inf")
    x[3] = float("-inf")
    x[4, :100] = -5.0  # top-k boundary tied across tiles: all 200 tokens tied at 4.0 are kept
    x[4, 100:] = 4.0
    x[5, :] = 0.0
    x[5, 299] = 1.0
    T = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0], device=DEVICE)
    ids, logprobs = _op(x, T, torch.tensor([0, 0, 0, 0, 150, 0], device=DEVICE))
    assert ids[0].item() == 17 and ids[5].item() == 299
    assert ids[1:4].tolist() == [-1, -1, -1] and torch.isnan(logprobs[1:4]).all()
    assert torch.isfinite(logprobs[[0, 4, 5]]).all()
    tiles(256)
    n = 32
    tied = x[4:5].expand(n, V)
    drawn, _ = _op(tied, torch.ones(n, device=DEVICE), torch.full((n,), 150, device=DEVICE), torch.arange(n, device=DEVICE))
    assert drawn.min().item() >= 100 and drawn.unique().numel() > 20


@pytest.mark.parametrize("shape", list(SHAPES))
def test_small_tiles_softmax(tiles, shape):
    tile, B, V = SHAPES[shape]
    tiles(tile)
    x = torch.randn(B, V, device=DEVICE) * 4
    x[0, 5] = float("-inf")
    for T in (0.6, 1.0):
        torch.testing.assert_close(lmkern.softmax(x, T, backend="triton"), torch.softmax(x / T, -1))
    one_hot = lmkern.softmax(x, 0.0, backend="triton")
    assert torch.equal(one_hot, torch.nn.functional.one_hot(x.argmax(-1), V).float())
