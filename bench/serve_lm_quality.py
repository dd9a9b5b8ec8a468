"""The causal-lm runtime's precision trade-off: perplexity and decoding speed, int8 (and bf16) vs fp32.

    .venv/bin/python bench/serve_lm_quality.py --checkpoint /path/to/checkpoints   # a Tandem checkpoint
    .venv/bin/python bench/serve_lm_quality.py --train-steps 300                 # trains a tiny GPT first

Perplexity is measured on held-out text (a generated corpus with another seed than the training corpus),
in non-overlapping windows of the model's block size, with the runtime's own loading path (`CausalLM.load`,
so int8 is the server's dynamic quantization of every Linear layer). Speed: greedy decoding steps/s through
`CausalLM.step` at batch 1 and at --batch, no server.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.api.serving import ServingPrecision as Precision
from tandem.workloads.data.corpus import generate
from tandem.workloads.serve.generation import GenSequence, SamplingParams
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.causal_lm import CausalLM


def train(directory: Path, steps: int, size: str) -> Path:
    from tandem.workloads.train.config import TrainConfig
    from tandem.workloads.train.loop import DistInfo, run_builtin

    config = TrainConfig(
        job_name="lm-quality",
        model_size=size,
        dataset_uri="tandem://corpus",
        max_steps=steps,
        seq_len=128,
        per_device_batch=16,
        global_batch=16,
        checkpoint_dir=str(directory),
        checkpoint_every_steps=steps,
        warmup_steps=min(100, steps // 10),
        learning_rate=3e-3,
    )
    run_builtin(config, DistInfo())
    return directory


def perplexity(lm: CausalLM, text: str, windows: int) -> float:
    model = lm.gpt
    ids = torch.tensor(lm.encode(text), dtype=torch.long)
    size = lm.block_size + 1
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in range(min(windows, (len(ids) - 1) // size)):
            chunk = ids[w * size : (w + 1) * size].unsqueeze(0).to(next(model.parameters()).device)
            logits, _ = model(chunk[:, :-1], chunk[:, 1:])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
            total += float(loss) * (size - 1)
            count += size - 1
    return math.exp(total / count)


def steps_per_second(lm: CausalLM, batch: int, steps: int) -> float:
    sequences = [
        GenSequence(lm.encode("The quick brown fox "), SamplingParams(temperature=0)) for _ in range(batch)
    ]
    started = time.perf_counter()
    for _ in range(steps):
        for seq, token in zip(sequences, lm.step(sequences), strict=True):
            seq.ids.append(token)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a Tandem checkpoint (directory or root)")
    parser.add_argument("--train-steps", type=int, default=300, help="without --checkpoint: train this long")
    parser.add_argument("--size", default="tiny", help="without --checkpoint: the built-in size to train")
    parser.add_argument("--windows", type=int, default=200, help="held-out windows for perplexity")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64, help="decoding steps per speed measurement")
    parser.add_argument(
        "--precisions", default="fp32,int8", help="e.g. fp32,int8 (CPU) or fp32,bf16,fp16 (GPU)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or train(Path(scratch), args.train_steps, args.size)
        held_out = generate(sentences=4000, seed=99)
        print(f"checkpoint: {checkpoint}; {torch.get_num_threads()} torch threads; device {args.device}")
        print(f"\n| precision | perplexity | delta vs fp32 | steps/s batch 1 | tokens/s batch {args.batch} |")
        print("|---|---|---|---|---|")
        reference = None
        for name in args.precisions.split(","):
            lm = CausalLM(ModelOptions("lm", checkpoint, args.device, Precision(name)))
            lm.load()
            lm.warm_up(args.batch)
            ppl = perplexity(lm, held_out, args.windows)
            reference = reference if reference is not None else ppl
            one = steps_per_second(lm, 1, args.steps)
            many = steps_per_second(lm, args.batch, args.steps) * args.batch
            delta = f"{100 * (ppl / reference - 1):+.2f}%"
            print(f"| {name} | {ppl:.4f} | {delta} | {one:.0f} | {many:.0f} |", flush=True)


if __name__ == "__main__":
    main()
