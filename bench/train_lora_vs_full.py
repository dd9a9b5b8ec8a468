"""LoRA against full fine-tuning of the built-in GPT on one device: tokens/s, peak memory, checkpoint size.

    python bench/train_lora_vs_full.py --device cuda                      # 124m, seq 1024, batch 16, bf16
    python bench/train_lora_vs_full.py --device cpu --size tiny --seq-len 64 --batch 4 --steps 5   # smoke

Every mode runs `GPTRun.train_step()`, the exact step a TrainingJob with `spec.trainer.builtin.fineTuning`
runs (data sampler, autocast, clipping, fused AdamW on CUDA, optional torch.compile), from the same base
checkpoint (a freshly initialised GPT of the size, written once as a Tandem checkpoint) on random tokens
of GPT-2's vocabulary (50257) from a token file:

full       - every weight trains (AdamW state for all of them; checkpoints hold the whole model);
lora-attn  - rank 8 adapters on attn.c_attn and attn.c_proj (the default targetModules);
lora-all   - rank 16 adapters on all four linear layers of every block.

Prints tokens/s, ms/step, peak GPU memory allocated (`torch.cuda.max_memory_allocated`; not measured on
a CPU), trainable parameters and the bytes one checkpoint writes, and each mode against full.
Plain torch and this checkout only: no Ray, no cluster.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tandem.api.common import Precision
from tandem.workloads.models.gpt import GPT, config_for
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.finetune import FineTune
from tandem.workloads.train.loop import DistInfo, GPTRun

VOCAB = 50257
MODES: dict[str, dict[str, object] | None] = {
    "full": None,
    "lora-attn": {"rank": 8, "alpha": 16.0, "targetModules": ["attn.c_attn", "attn.c_proj"], "dropout": 0.0},
    "lora-all": {
        "rank": 16,
        "alpha": 32.0,
        "targetModules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        "dropout": 0.0,
    },
}


@dataclass
class Result:
    mode: str
    seconds_per_step: float
    tokens_per_second: float
    peak_bytes: int
    trainable: int
    checkpoint_bytes: int


def write_base(root: Path, size: str, seq_len: int) -> tuple[Path, dict[str, object]]:
    """A base checkpoint of the size (random weights: throughput does not depend on them)."""
    torch.manual_seed(0)
    config = config_for(size, block_size=seq_len, vocab_size=VOCAB)
    model = GPT(config)
    with ckpt.staging(root, 0) as st:
        st.save_torch(ckpt.MODEL_FILE, model.state_dict())
        ref = st.publish({"model": {"family": "gpt", "size": size, "config": config.to_dict()}})
    return ref.path, config.to_dict()


def write_tokens(path: Path, count: int) -> None:
    np.random.default_rng(0).integers(0, VOCAB, count, dtype=np.uint16).tofile(path)


def measure(mode: str, cfg: TrainConfig, steps: int, warmup: int, device: str) -> Result:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = GPTRun(cfg, DistInfo())
    for _ in range(warmup):  # compile and allocator warm-up included here
        run.train_step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = run.train_step()
    float(loss)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else -1  # no per-mode peak on a CPU
    trainable = sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad)
    event = run.save(float(loss))
    result = Result(mode, seconds, cfg.tokens_per_step / seconds, peak, trainable, event.bytes)
    del run
    return result


def peak(nbytes: int) -> str:
    return "-" if nbytes < 0 else f"{nbytes / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default cuda)"
    )
    parser.add_argument(
        "--size", default="124m", help="built-in GPT size: tiny, small, medium, 124m (default)"
    )
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (default 1024)")
    parser.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (spec compile: true)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu for a smoke run)")
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; known: {', '.join(MODES)}")

    with tempfile.TemporaryDirectory(prefix="tandem-lora-bench-") as tmp:
        root = Path(tmp)
        base_path, model_config = write_base(root / "base", args.size, args.seq_len)
        data = root / "tokens.bin"
        write_tokens(data, max(2_000_000, (args.steps + args.warmup + 2) * args.batch * (args.seq_len + 1)))
        cfg = TrainConfig(
            job_name="bench",
            model_size=args.size,
            dataset_uri=str(data),
            data_format="tokens",
            vocab_size=VOCAB,
            max_steps=10_000,
            warmup_steps=1,
            seq_len=args.seq_len,
            per_device_batch=args.batch,
            global_batch=args.batch,
            precision=Precision.BF16 if args.device == "cuda" else Precision.FP32,
            use_gpu=args.device == "cuda",
            compile=args.compile,
            checkpoint_keep=1,
        )
        results = []
        for mode in modes:
            tune = FineTune(
                base_uri=ckpt.path_to_uri(base_path),
                base_path=str(base_path),
                base_step=0,
                base_job=None,
                model_config=model_config,
                lora=MODES[mode],
            )
            mode_cfg = replace(cfg, fine_tuning=tune.to_dict(), checkpoint_dir=str(root / mode))
            results.append(measure(mode, mode_cfg, args.steps, args.warmup, args.device))

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{device}, GPT {args.size}, seq {args.seq_len}, batch {args.batch}, "
        f"{'bf16' if args.device == 'cuda' else 'fp32'}, compile {args.compile}, {args.steps} steps"
    )
    full = next((r for r in results if r.mode == "full"), None)
    header = f"{'mode':<10} {'tokens/s':>11} {'ms/step':>9} {'peak MiB':>9} {'trainable':>12} {'ckpt MiB':>9}"
    if full:
        header += f" {'speed vs full':>14} {'memory vs full':>15}"
    print(header)
    for r in results:
        line = (
            f"{r.mode:<10} {r.tokens_per_second:>11,.0f} {r.seconds_per_step * 1e3:>9.1f} "
            f"{peak(r.peak_bytes):>9} {r.trainable:>12,} {r.checkpoint_bytes / 2**20:>9.2f}"
        )
        if full:
            memory = "-" if full.peak_bytes <= 0 else f"{r.peak_bytes / full.peak_bytes:.2f}x"
            line += f" {r.tokens_per_second / full.tokens_per_second:>13.2f}x {memory:>15}"
        print(line)


if __name__ == "__main__":
    main()
