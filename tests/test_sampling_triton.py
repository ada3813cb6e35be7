"""The Triton sampling kernels' tile shapes, which the backend-parametrized suite (test_sampling.py)
cannot reach on the interpreter: its tiles there hold whole rows up to V = 65536. Shrinking the
tiles makes every row span several tiles (and several rows share one), so the looped passes, the
tile-skipping race and the multi-level threshold search all run on small inputs. Likewise the
split-row path (several programs per row), which the launcher only chooses on a GPU, is forced
here with SAMPLE_SPLITS."""

from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------- split rows
#
# The split path (several programs per row, kernels/sampling.py _sample_split) must draw exactly the
# one-program kernel's ids; its logprob sums exp over splits in another order (fp32 rounding only).
# V = 300 over 64-element tiles: 5 tiles, the last 44 columns wide; splits 2 -> 3 + 2 tiles,
# 3 -> 2 + 2 + 1, 7 -> one tile each. (The interpreter pays per program and per tile.)
SPLIT_TILE, SPLIT_V = 64, 300


def _per_row(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# (splits, kwargs); min-p runs in "all" and "per_row"
SPLIT_CONFIGS = {
    "plain": (7, lambda: dict()),
    "top_k": (3, lambda: dict(top_k=6)),
    "top_p": (2, lambda: dict(temperature=1.5, top_p=0.7)),
    "all": (3, lambda: dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)),
    # per row: greedy (T = 0), top-k > V, disabling values, per-row seeds
    "per_row": (2, lambda: dict(
        temperature=_per_row(0.7, 0.0, 1.3), top_k=_per_row(40, 0, 400, dtype=torch.int64),
        top_p=_per_row(0.9, 1.0, 0.5), min_p=_per_row(0.02, 0.0, 0.1), seed=_per_row(11, -5, 2**40, dtype=torch.int64),
    )),
}


@pytest.fixture
def force_splits(tiles, monkeypatch):
    """force_splits(n): from now on the Triton sampler runs n programs per row (1: the one-program
    kernel), over tiles of SPLIT_TILE elements."""
    tiles(SPLIT_TILE)
    return lambda splits: monkeypatch.setattr(sampling_ops.triton_sampling, "SAMPLE_SPLITS", splits)


def _sample(x, **kwargs):
    return lmkern.sample(x, **kwargs, return_logprobs=True, backend="triton")


def _assert_same_draws(one, split):
    assert torch.equal(split[0], one[0]), f"split ids {split[0].tolist()} != one-program ids {one[0].tolist()}"
    torch.testing.assert_close(split[1], one[1], rtol=2e-6, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("config", list(SPLIT_CONFIGS))
def test_split_rows_match_one_program_and_oracle(force_splits, config):
    splits, make = SPLIT_CONFIGS[config]
    cfg = make()
    B = cfg["temperature"].numel() if isinstance(cfg.get("temperature"), torch.Tensor) else 2
    x = torch.randn(B, SPLIT_V, device=DEVICE) * 3
    x[0, ::7] = float("-inf")
    x[1, 128:192] = float("-inf")  # a whole tile of -inf
    x[1, 60:] = x[1, :60].max() - 1.0 - x[1, 60:].abs()  # the mass sits in the first tile
    cfg.setdefault("seed", 1234)
    force_splits(1)
    one = _sample(x, **cfg)
    force_splits(splits)
    split = _sample(x, **cfg)
    _assert_same_draws(one, split)
    seed = cfg.pop("seed")
    per_row_seeds = isinstance(seed, torch.Tensor)
    want = oracle(x, **cfg, seed=0 if per_row_seeds else seed, seeds=seed if per_row_seeds else None)
    assert check_against_oracle(*split, want, f"split {config}") <= allowed_mismatches(B)


def test_split_rows_ties_greedy_and_invalid_rows(force_splits):
    # 2 splits: columns [0, 192) and [192, 300)
    x = torch.randn(7, SPLIT_V, device=DEVICE)
    x[0, [250, 20, 299]] = 9.0  # greedy: the first maximum, in the first split
    x[1, 290] = float("nan")  # invalid rows, the bad value in the last (ragged) split
    x[2, 100] = float("inf")
    x[3] = float("-inf")
    x[4, :50] = -5.0  # top-k boundary: the 250 tokens tied at 4.0 span both splits, all kept
    x[4, 50:] = 4.0
    x[5, :260] = float("-inf")  # the only finite logits are in the last split
    x[6] = 0.0  # every token tied: the logprob is -log(V)
    T = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=DEVICE)
    k = torch.tensor([0, 0, 0, 0, 100, 3, 5], device=DEVICE)
    draws = []
    for splits in (1, 2):
        force_splits(splits)
        draws.append(_op(x, T, k))  # the op itself: invalid rows give -1 instead of an exception
    _assert_same_draws(*draws)
    ids, logprobs = draws[1]
    assert ids[0].item() == 20
    assert ids[1:4].tolist() == [-1, -1, -1] and torch.isnan(logprobs[1:4]).all()
    assert ids[4].item() >= 50 and ids[5].item() >= 260
    torch.testing.assert_close(logprobs[6].item(), -math.log(SPLIT_V))


def test_split_rows_overflowing_temperature_take_the_first_max(force_splits):
    # x_max / T overflows float32 (up, or every z down to -inf): the first max, split or not
    x = torch.randn(3, SPLIT_V, device=DEVICE) * 3
    x[:, [250, 20, 299]] = 50.0
    x[1] -= 1e30  # every logit about -1e30: all tied, the first is the max
    T = torch.tensor([1e-38, 1e-10, 1e-36], device=DEVICE)  # 50 / 1e-36 fits float32: drawn
    draws = []
    for splits in (1, 3):
        force_splits(splits)
        draws.append(_sample(x, temperature=T, top_k=5, top_p=0.9, seed=2))
    _assert_same_draws(*draws)
    assert draws[1][0][:2].tolist() == [20, 0]


def test_split_rows_under_torch_compile(force_splits):
    force_splits(2)
    x = torch.randn(1, SPLIT_V, device=DEVICE)
    f = torch.compile(lambda x, s: _sample(x, top_k=9, seed=s), fullgraph=True)
    compiled, eager = f(x, 5), _sample(x, top_k=9, seed=5)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_split_count_must_be_positive():
    x = torch.randn(1, 8, device=DEVICE)
    ids = torch.empty(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="splits"):
        sampling_ops.triton_sampling.sample(x, 1.0, 0, 1.0, 0.0, None, None, None, None, 0, None, ids, None, splits=0)
