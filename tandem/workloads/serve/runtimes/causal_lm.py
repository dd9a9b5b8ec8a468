"""The `causal-lm` runtime: a GPT checkpoint of Tandem's training workload, one decoding step at a time.

`--model-uri` is a checkpoint directory (`.../step-00000200`) or the checkpoint root (its newest complete
checkpoint is used), as `tandem.workloads.models.gpt.load_for_inference` reads them. The generation scheduler
(`tandem.workloads.serve.generation`) calls `step` with every active sequence. `kv_cache.DecodeCache` computes
the next-token logits: a sequence's first step runs its whole context (right-padded with the other new ones
into one batch; causal attention: the padding after a row never changes it) and keeps its keys and values,
later steps run only its newest token (on CUDA through captured CUDA graphs). A step whose rows are all
greedy without `logit_bias` or penalties takes the argmax made on the device (one id per row comes back)
and, on CUDA, launches the next decoding pass at once (`DecodeCache.greedy_step`: the GPU works while the
scheduler handles the tokens); otherwise each row is sampled from the logits with its own parameters and
random generator.
Contexts hold at most `block_size` tokens: older tokens slide out of the window like `GPT.generate`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tandem.api.serving import CudaGraphs, Runtime
from tandem.api.serving import ServingPrecision as Precision
from tandem.errors import UserError
from tandem.workloads.serve.generation import GenSequence, SamplingParams
from tandem.workloads.serve.model import (
    ModelOptions,
    check_precision,
    quantize_int8,
    torch_device,
    torch_dtype,
)
from tandem.workloads.serve.sampling import adjust_logits, record_logprobs

if TYPE_CHECKING:
    import torch

    from tandem.workloads.models.gpt import GPT
    from tandem.workloads.models.tokenizer import ByteTokenizer, HFTokenizer
    from tandem.workloads.serve.runtimes.kv_cache import DecodeCache

WARM_UP_PROMPT = "The model server warms up. "
_BYTES = [bytes([i]) for i in range(256)]


def _byte_of(token: int) -> bytes:
    """Byte-level: ids below 256 are bytes, the specials none (a table: called for every token)."""
    return _BYTES[token] if 0 <= token < 256 else b""


def _prompt_chars(tokenizer: ByteTokenizer | HFTokenizer, window: int) -> int:
    """How many trailing characters of a prompt can reach a `window` of tokens: the byte tokenizer
    gives every character at least one token; another tokenizer at most its longest token's characters."""
    from tandem.workloads.models.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return window
    return window * max(1, tokenizer.longest_token_chars())


class CausalLM:
    runtime = Runtime.CAUSAL_LM

    def __init__(self, options: ModelOptions) -> None:
        self.name = options.name
        self.options = options
        self.eos_id: int | None = None
        self.block_size = 0
        self.vocab_size = 0
        self._cache: DecodeCache | None = None
        self._tokenizer: ByteTokenizer | HFTokenizer | None = None
        self._device: torch.device | None = None
        self._meta: dict[str, Any] = {}
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def gpt(self) -> GPT:
        """The loaded model (e.g. to measure its perplexity)."""
        assert self._cache is not None, "load() first"
        return self._cache.model

    def load(self) -> None:
        import torch

        from tandem.workloads.models.gpt import load_for_inference
        from tandem.workloads.models.lora import lineage
        from tandem.workloads.serve.runtimes.kv_cache import DecodeCache

        device = torch_device(self.options.device)
        check_precision(self.options.precision, device)
        dtype = torch_dtype(self.options.precision)
        try:
            model, tokenizer, config = load_for_inference(
                self.options.path, device=device, dtype=None if dtype == torch.float32 else dtype
            )
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(
                f"--model-uri {self.options.path}: {exc}; the causal-lm runtime serves checkpoints written "
                "by Tandem's training workload (a step-NNNNNNNN directory or the checkpoint root)"
            ) from exc
        if self.options.precision is Precision.INT8:
            model = quantize_int8(model)  # type: ignore[assignment]
        if device.type == "cuda":
            # cuDNN's attention plans each new (batch, length) shape once, ~50 ms on an H100: training
            # repeats one shape, but continuous batching meets new ones all the time.
            torch.backends.cuda.enable_cudnn_sdp(False)
        torch.set_grad_enabled(False)
        graphs = self.options.cuda_graphs
        if graphs is CudaGraphs.ON and device.type != "cuda":
            raise UserError(f"--cuda-graphs on needs a CUDA device, not {device}: use auto or off")
        self._cache = DecodeCache(
            model,
            keep=self.options.kv_cache,
            vocab=tokenizer.vocab_size,
            cuda_graphs=None if graphs is CudaGraphs.AUTO else graphs is CudaGraphs.ON,
        )
        self._tokenizer, self._device = tokenizer, device
        self.eos_id = tokenizer.eos_id
        self.block_size = config.block_size
        self.prompt_chars = _prompt_chars(tokenizer, config.block_size)
        self.vocab_size = tokenizer.vocab_size
        self._meta = {
            "platform": "tandem_gpt",
            "block_size": config.block_size,
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": tokenizer.name,
            **lineage(self.options.path),  # a fine-tune: its base checkpoint (LoRA merged at load)
        }

    def warm_up(self, max_batch_size: int) -> None:
        """Size the cache for the largest batch (so that its CUDA graphs never need recapturing), prepare
        every decoding shape up to it and the small prefills (on CUDA: capture their graphs now, not while
        requests wait: `DecodeCache.prepare_shapes`), then two steps (a whole context, then one cached
        token) at batch 1 and at the largest batch."""
        import torch

        cache = self._cache
        assert cache is not None, "load() first"
        if cache.keep:
            try:
                cache.reserve(max_batch_size)
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                need = max_batch_size * cache.slot_bytes / 2**30
                raise UserError(
                    f"--max-batch-size {max_batch_size}: the KV cache needs {need:.1f} GiB on "
                    f"{self._device} ({cache.slot_bytes / 2**20:.0f} MiB a sequence), more than is free; "
                    "lower --max-batch-size or use --kv-cache off"
                ) from exc
            cache.prepare_shapes(max_batch_size)
        for size in sorted({1, max_batch_size}):
            batch = [
                GenSequence(self.encode(WARM_UP_PROMPT), SamplingParams(temperature=1.0, seed=i))
                for i in range(size)
            ]
            for _ in range(2):
                for seq, token in zip(batch, self.step(batch), strict=True):
                    seq.ids.append(token)
        self._ready = True

    def encode(self, text: str) -> list[int]:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer.decode(ids)

    @property
    def token_bytes(self) -> Callable[[int], bytes] | None:
        """What bytes a token stands for, with the byte tokenizer (the scheduler then decodes each
        sequence byte-wise); None with a checkpoint's own tokenizer (decoded over a window of tokens)."""
        from tandem.workloads.models.tokenizer import ByteTokenizer

        return _byte_of if isinstance(self._tokenizer, ByteTokenizer) else None

    def cache_usage(self) -> tuple[int, int, int]:
        """(sequences held, slots allocated, bytes allocated) of the KV cache, for the metrics."""
        cache = self._cache
        if cache is None:
            return 0, 0, 0
        return cache.holding, cache.capacity, cache.capacity * cache.slot_bytes

    def step(self, batch: list[GenSequence]) -> list[int]:
        import torch

        assert self._cache is not None, "load() first"
        contexts = [seq.ids for seq in batch]  # the cache takes each window itself (no copy a step)
        with torch.inference_mode():
            if all(seq.params.plain_greedy for seq in batch):
                # Chosen on the device among the tokenizer's ids; on CUDA the next step is launched before
                # returning, so the GPU computes it while the scheduler handles these tokens.
                return self._cache.greedy_step(list(batch), contexts)
            logits = self._cache.step(list(batch), contexts).logits()
            logits[:, self.vocab_size :] = -float("inf")  # padding ids of the embedding table
            return self._sample(batch, logits)

    def _sample(self, batch: list[GenSequence], logits: torch.Tensor) -> list[int]:
        import torch

        adjust_logits(batch, logits)  # logit_bias, presence and frequency penalties
        chosen = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(batch):
            params = seq.params
            if params.temperature <= 0:
                continue
            if seq.state is None:
                generator = torch.Generator(device=logits.device)
                generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
                seq.state = generator
            probs = torch.softmax(logits[i] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                outside = ordered.cumsum(0) - ordered > params.top_p  # keep the smallest set reaching top_p
                ordered[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            chosen[i] = int(torch.multinomial(probs, 1, generator=seq.state).item())
        record_logprobs(batch, logits, chosen)
        return [int(t) for t in chosen]

    def predict(self, batch: list[GenSequence]) -> list[int]:
        """The `Model` protocol's batch call: one decoding step."""
        return self.step(batch)

    def metadata(self) -> dict[str, Any]:
        return {
            **self._meta,
            "precision": str(self.options.precision),
            "device": str(self._device) if self._device else self.options.device,
        }
