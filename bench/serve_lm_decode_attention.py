"""The decoding step's attention alone (one new token per row over its cached keys and values), in the ways
the KV cache could lay out and compute it; each captured in a CUDA graph (12 layers' worth) so only the
GPU's time counts.

    python bench/serve_lm_decode_attention.py --batches 32,256 --width 320        # one GPU

Layouts: `pos-major` is the cache's pool before issue 17's second round, `(slots, positions, heads, dim)` per
layer (a row's keys for one head are 128-byte pieces 1.5 KB apart); `head-major` is `(slots, heads,
positions, dim)` (each row and head's keys contiguous). Computations: SDPA with a boolean mask, SDPA with an
additive mask in the model's dtype, and two matrix products around a softmax. Rows have ragged lengths
(uniform in width/2..width), attention runs over `width` positions with a mask.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

HEADS, DIM, LAYERS, BLOCK = 12, 64, 12, 1024


def time_graph(body: Callable[[], None], repeats: int = 50) -> float:
    """Milliseconds per replay of `body` captured in a CUDA graph."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / repeats


def measure(batch: int, width: int) -> None:
    """Print one row per layout and computation at this batch size."""
    dtype, device = torch.bfloat16, "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(width // 2, width + 1, (batch,), device=device, generator=gen)
    bool_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    add_mask = torch.zeros(bool_mask.shape, dtype=dtype, device=device).masked_fill(~bool_mask, -float("inf"))
    q = torch.randn(batch, HEADS, 1, DIM, dtype=dtype, device=device)
    pos_major = torch.randn(LAYERS, 2, batch, BLOCK, HEADS, DIM, dtype=dtype, device=device)
    head_major = pos_major.transpose(3, 4).contiguous()
    out = torch.empty(batch, HEADS, 1, DIM, dtype=dtype, device=device)

    def views(layout: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layout == "pos-major":
            kv = pos_major[layer, :, :, :width].transpose(2, 3)
        else:
            kv = head_major[layer, :, :, :, :width]
        return kv[0], kv[1]

    def sdpa(layout: str, mask: torch.Tensor) -> Callable[[], None]:
        def body() -> None:
            for layer in range(LAYERS):
                k, v = views(layout, layer)
                out.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

        return body

    def matmuls(layout: str) -> Callable[[], None]:
        scale = DIM**-0.5

        def body() -> None:
            for layer in range(LAYERS):
                k, v = views(layout, layer)
                scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + add_mask.float()
                out.copy_(torch.matmul(torch.softmax(scores, dim=-1).to(dtype), v))

        return body

    kv_bytes = LAYERS * 2 * batch * width * HEADS * DIM * 2
    for layout in ("pos-major", "head-major"):
        for name, body in (
            ("SDPA, bool mask", sdpa(layout, bool_mask)),
            ("SDPA, additive mask", sdpa(layout, add_mask)),
            ("matmul-softmax-matmul", matmuls(layout)),
        ):
            ms = time_graph(body)
            print(f"| {batch} | {layout} | {name} | {ms:.3f} | {kv_bytes / ms / 1e6:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; "
        f"ms for {LAYERS} layers, width {args.width}"
    )
    print("| batch | layout | computation | ms | KV GB/s |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        measure(batch, args.width)


if __name__ == "__main__":
    main()
