"""Decoding with and without the causal-lm runtime's key/value cache, side by side in one run.

    .venv/bin/python bench/serve_lm_kv_cache.py --size tiny --batches 1,8 --new-tokens 64     # CPU
    python bench/serve_lm_kv_cache.py --device cuda --size 124m --precision bf16 \\
        --batches 1,8,32 --prompt-tokens 64 --new-tokens 448                                # one GPU

The model: the built-in GPT `--size` with random weights (seeded), EOS's embedding row zeroed so greedy
decoding never stops early (every sequence makes exactly --new-tokens tokens). For each batch size, a static
batch of --prompt-tokens-long prompts is decoded greedily through `kv_cache.DecodeCache` as the runtime
drives it (one call per step, every sequence's window), once caching nothing (every step runs every whole
context: the runtime before the cache) and once keeping keys and values; the two alternate --repeats times
and the best of each is reported. "same" says whether both made the same tokens (greedy; at bf16/fp16 a
different summation order may flip a near-tie).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from tandem.workloads.models.gpt import GPT, config_for
from tandem.workloads.models.tokenizer import ByteTokenizer
from tandem.workloads.serve.runtimes.kv_cache import DecodeCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, device: str, precision: str, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_for(size))
    with torch.no_grad():
        model.wte.weight[ByteTokenizer().eos_id].zero_()
    return model.to(device=device, dtype=DTYPES[precision]).eval()


def decode(
    model: GPT, keep: bool, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Seconds to decode `new_tokens` for every prompt together, and the generated tokens."""
    cache = DecodeCache(model, keep=keep)
    block = model.config.block_size
    owners = [object() for _ in prompts]
    ids = [list(p) for p in prompts]
    device = model.wte.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            chosen = cache.logits(owners, [s[-block:] for s in ids]).argmax(dim=-1).tolist()
            for seq, token in zip(ids, chosen, strict=True):
                seq.append(int(token))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, [s[len(p) :] for s, p in zip(ids, prompts, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny", help="built-in GPT size: tiny, small, medium, 124m")
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per sequence")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build(args.size, args.device, args.precision, args.seed)
    if args.prompt_tokens + args.new_tokens > model.config.block_size:
        print(f"note: contexts pass block_size {model.config.block_size}: the window slides, uncached")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"{args.size} ({model.num_parameters() / 1e6:.1f}M parameters), {args.precision}, {name}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens per sequence\n"
    )
    print("| batch | tokens/s, whole contexts | tokens/s, KV cache | ratio | same tokens |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, 256, (batch, args.prompt_tokens), generator=gen).tolist()
        decode(model, True, prompts, 8)  # warm-up: both kinds of pass at this batch size
        decode(model, False, prompts, 8)
        best: dict[bool, float] = {True: float("inf"), False: float("inf")}
        tokens: dict[bool, list[list[int]]] = {}
        for _ in range(args.repeats):
            for keep in (False, True):
                seconds, tokens[keep] = decode(model, keep, prompts, args.new_tokens)
                best[keep] = min(best[keep], seconds)
        made = batch * args.new_tokens
        whole, cached = made / best[False], made / best[True]
        same = "yes" if tokens[True] == tokens[False] else "no"
        print(f"| {batch} | {whole:,.0f} | {cached:,.0f} | {cached / whole:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
