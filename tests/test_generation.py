"""lmkern.generate over a Hugging Face causal LM: a tiny random-weight Llama built locally."""

import pytest
import torch

import lmkern

transformers = pytest.importorskip("transformers", reason="transformers is part of `make test`'s environment")


def tiny_llama(vocab=128):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Random init gives nearly uniform logits; a larger head spreads them, so greedy choices are
    # not near-ties that fp32 summation order could flip.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def prompts(vocab, lengths):
    """Left-padded batch of random prompts (pad id 0) and its attention mask."""
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, S - n:] = torch.randint(3, vocab, (n,))
        mask[r, S - n:] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [[7], [5, 9, 3]])
def test_greedy_matches_transformers_generate(lengths):
    model = tiny_llama()
    ids, mask = prompts(128, lengths)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    got = lmkern.generate(model, ids, max_new_tokens=12, temperature=0.0, attention_mask=mask)
    assert torch.equal(got, want)


def test_top_k_1_is_greedy():
    model = tiny_llama()
    ids, mask = prompts(128, [6, 4])
    greedy = lmkern.generate(model, ids, max_new_tokens=8, temperature=0.0, attention_mask=mask)
    top1 = lmkern.generate(model, ids, max_new_tokens=8, temperature=0.8, top_k=1, attention_mask=mask, seed=3)
    assert torch.equal(top1, greedy)


def test_rows_stop_at_eos_and_are_padded():
    model = tiny_llama()
    ids, mask = prompts(128, [5, 5, 5, 5])
    free = lmkern.generate(model, ids, max_new_tokens=10, temperature=1.0, attention_mask=mask, seed=11)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 2])  # a token row 0 produces at step 2: make it the end-of-sequence id
    got = lmkern.generate(model, ids, max_new_tokens=10, temperature=1.0, attention_mask=mask, seed=11,
                          eos_token_id=eos, pad_token_id=0)
    gnew = got[:, ids.shape[1]:]
    for r in range(4):
        hits = (new[r] == eos).nonzero()
        if len(hits):  # up to and including the first eos the row is unchanged, then padding
            stop = int(hits[0]) + 1
            assert torch.equal(gnew[r, :stop], new[r, :stop])
            assert (gnew[r, stop:] == 0).all()
        else:
            assert torch.equal(gnew[r], new[r, :gnew.shape[1]])
    assert gnew.shape[1] <= 10


def test_seed_reproducible_and_sensitive():
    model = tiny_llama()
    ids, mask = prompts(128, [6, 6, 6])
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, attention_mask=mask)
    a = lmkern.generate(model, ids, seed=5, **kw)
    b = lmkern.generate(model, ids, seed=5, **kw)
    c = lmkern.generate(model, ids, seed=6, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 48 draws from a spread distribution: equal only by a huge fluke
    torch.manual_seed(1)
    d = lmkern.generate(model, ids, **kw)
    torch.manual_seed(1)
    e = lmkern.generate(model, ids, **kw)
    assert torch.equal(d, e)


def test_logprobs_are_those_of_the_chosen_tokens():
    model = tiny_llama()
    ids, mask = prompts(128, [4, 6])
    out, lp = lmkern.generate(model, ids, max_new_tokens=5, temperature=0.7, attention_mask=mask, seed=2, return_logprobs=True)
    # Re-score the generated sequence in one forward pass.
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(out, attention_mask=full_mask, position_ids=pos).logits.float()
    S = ids.shape[1]
    want = torch.log_softmax(logits[:, S - 1:-1], -1).gather(-1, out[:, S:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want, rtol=1e-4, atol=1e-4)


def test_patched_model_generates_the_same_greedy_tokens():
    model = tiny_llama()
    ids, mask = prompts(128, [8, 5])
    want = lmkern.generate(model, ids, max_new_tokens=10, temperature=0.0, attention_mask=mask)
    assert lmkern.patch(model) == 2 * 2 + 1  # two norms per layer and the final norm
    got = lmkern.generate(model, ids, max_new_tokens=10, temperature=0.0, attention_mask=mask)
    assert torch.equal(got, want)


def test_bad_arguments():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(ValueError, match="input_ids"):
        lmkern.generate(model, ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lmkern.generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        lmkern.generate(model, ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="seed or generator"):
        lmkern.generate(model, ids, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="eos_token_id"):
        lmkern.generate(model, ids, eos_token_id=[-1])
