"""lmkern.patch(model, attention=True) on tiny random models of many transformers families, against
the same model with transformers' own sdpa attention: padded forward passes, greedy generation
with dynamic and static caches, and lmkern.generate's greedy loop.

Each family stresses another path of the integration: sliding windows (masks that sdpa_mask builds
per layer type), Gemma's norms and KV-shared layers, multi-head latent attention (DeepSeek V3: value
head dim != query head dim), local attention in an encoder (ModernBERT), a position bias (T5) and
cross-attention (T5, BART).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lmkern

transformers = pytest.importorskip("transformers", reason="transformers is part of `make test`'s environment")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

V = 100
WINDOW = 4  # sliding windows shorter than the sequences
DECODER = dict(
    vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)
TWO_LAYER_TYPES = ["sliding_attention", "full_attention"]
MLA = dict(
    n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
    moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=16, num_key_value_heads=4, head_dim=8,
)
PER_LAYER = dict(
    num_hidden_layers=4, num_kv_shared_layers=2, sliding_window=WINDOW, layer_types=TWO_LAYER_TYPES * 2,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=V,
)

# name: (kind, model_type, config overrides of DECODER, or a whole config for other kinds)
FAMILIES = {
    "mistral_window": ("causal", "mistral", dict(sliding_window=WINDOW)),
    "qwen2_window": ("causal", "qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                             layer_types=TWO_LAYER_TYPES)),
    "gemma": ("causal", "gemma", {}),
    "gemma3": ("causal", "gemma3_text", dict(sliding_window=WINDOW, layer_types=TWO_LAYER_TYPES)),
    "gemma3n": ("causal", "gemma3n_text", dict(PER_LAYER, laurel_rank=8, altup_num_inputs=2,
                                               activation_sparsity_pattern=[0.0] * 4, intermediate_size=[128] * 4)),
    "gemma4": ("causal", "gemma4_text", dict(PER_LAYER, global_head_dim=16)),
    "phi3_window": ("causal", "phi3", dict(sliding_window=WINDOW)),
    "gpt_neox": ("causal", "gpt_neox", dict(rotary_pct=0.5)),
    "starcoder2_window": ("causal", "starcoder2", dict(sliding_window=WINDOW)),
    "cohere2_window": ("causal", "cohere2", dict(sliding_window=WINDOW, layer_types=TWO_LAYER_TYPES)),
    "smollm3": ("causal", "smollm3", dict(no_rope_layers=[1, 0])),
    "deepseek_v3": ("causal", "deepseek_v3", MLA),
    "opt": ("causal", "opt", dict(
        vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )),
    "modernbert": ("encoder", "modernbert", dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        local_attention=WINDOW, global_attn_every_n_layers=2, pad_token_id=0, max_position_embeddings=128,
    )),
    "roberta": ("encoder", "roberta", dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=1,
    )),
    "t5": ("seq2seq", "t5", dict(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )),
    "bart": ("seq2seq", "bart", dict(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )),
}
LENGTHS = [12, 9, 5]  # real tokens per row, padded to 12 (longer than the windows)


def build(kind, model_type, overrides):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = CONFIG_MAPPING[model_type](**(dict(DECODER, **overrides) if kind == "causal" else overrides))
    auto = {"causal": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]
    torch.manual_seed(0)
    model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():  # norm weights and biases away from their init, so (1 + w) vs w would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(pad_id, left):
    ids = torch.randint(5, V, (len(LENGTHS), max(LENGTHS)))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        if left:
            mask[b, mask.shape[1] - n:] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def forward(model, kind, ids, mask):
    with torch.no_grad():
        if kind == "encoder":
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
        extra = {} if kind == "causal" else {"decoder_input_ids": 5 + torch.arange(6).expand(ids.shape[0], 6)}
        return model(input_ids=ids, attention_mask=mask, **extra).logits


def greedy(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6,
            pad_token_id=model.config.pad_token_id, cache_implementation=cache,
        )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_matches_sdpa(family, monkeypatch):
    kind, model_type, overrides = FAMILIES[family]
    torch.manual_seed(1)
    model = build(kind, model_type, overrides)
    ids, mask = padded_batch(model.config.pad_token_id, left=kind == "causal")
    want = forward(model, kind, ids, mask)
    patched = copy.deepcopy(model)
    lmkern.patch(patched, attention=True)
    assert patched.config._attn_implementation == "lmkern"
    calls = []
    real = lmkern.functional.scaled_dot_product_attention
    monkeypatch.setattr(lmkern.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = forward(patched, kind, ids, mask)
    assert calls, "lmkern's attention was not called"
    rows = mask.bool() if kind != "seq2seq" else slice(None)  # padded positions hold arbitrary values
    scale = want[rows].abs().max().clamp_min(1.0)
    torch.testing.assert_close(got[rows] / scale, want[rows] / scale, atol=2e-5, rtol=0)
    if kind == "encoder":
        return
    for cache in ("dynamic", "static"):
        assert torch.equal(greedy(patched, ids, mask, cache), greedy(model, ids, mask, cache)), cache
    if kind == "causal":  # lmkern's own loop, greedy, rows stopping at the end-of-sequence token
        pad, eos = model.config.pad_token_id, model.config.eos_token_id
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                  pad_token_id=pad, eos_token_id=eos)
        got = lmkern.generate(patched, ids, attention_mask=mask, max_new_tokens=6, temperature=0,
                              eos_token_id=eos, pad_token_id=pad)
        assert torch.equal(got, want)
