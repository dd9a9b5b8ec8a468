"""A GPT-style decoder-only language model (GPT-2 architecture, pre-LayerNorm, tied embeddings).

Stable API (the model server's `causal-lm` runtime loads Tandem checkpoints with it):

- `GPTConfig` and `SIZES` / `config_for(size)`: the shape of the model; `GPTConfig.to_dict()` is what a
  checkpoint's `metadata.json` records under `"model"`, and `GPTConfig.from_dict` reads it back.
- `GPT(config)`: `forward(idx, targets=None) -> (logits, loss)`, `generate(...)`, `num_parameters()`,
  `flops_per_token()`.
- `load_for_inference(checkpoint_dir) -> (model, tokenizer, config)`: a checkpoint written by the training
  driver (one `step-NNNNNNNN` directory, or the checkpoint root, whose newest complete checkpoint is used);
  a LoRA fine-tune's adapter-only checkpoint is loaded onto its base and merged (`models.lora`).

Sizes: `tiny` (about 0.4M parameters, for tests and CPU demos), `small` (about 3M), `medium` (about 25M),
`124m` (GPT-2 small: 12 layers, 768 wide, 12 heads). `SIZES` holds the byte tokenizer's padded vocabulary
(320) for the smaller sizes and GPT-2's padded 50304 for `124m` (the benchmarks' shape); a training run
sizes the table from its data's vocabulary (`config_for(..., vocab_size=)`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tandem.workloads.models.tokenizer import ByteTokenizer, HFTokenizer, pad_vocab

BYTE_VOCAB_PADDED = pad_vocab(ByteTokenizer().vocab_size)


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. `block_size` is the longest sequence (the position table's length)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = BYTE_VOCAB_PADDED
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if min(self.n_layer, self.n_head, self.n_embd, self.vocab_size, self.block_size) < 1:
            raise ValueError(f"every GPTConfig dimension must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in checkpoint metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Inverse of `to_dict`; unknown keys are ignored (forward compatible)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "medium": GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=512),
    "124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
}
"""Built-in sizes (the TrainingJob's `spec.trainer.builtin.size`)."""


def config_for(
    size: str, *, block_size: int | None = None, dropout: float | None = None, vocab_size: int | None = None
) -> GPTConfig:
    """The config of a built-in size, optionally with another sequence length, dropout or vocabulary.

    `vocab_size` is the data's (its tokenizer's ids); the embedding table is it rounded up to a multiple
    of 64, so the model and its data always agree (GPT-2's 50257 gives 50304).

    Raises `KeyError` naming the known sizes for an unknown one.
    """
    try:
        config = SIZES[size]
    except KeyError:
        raise KeyError(f"unknown GPT size {size!r}; known sizes: {', '.join(SIZES)}") from None
    if block_size is not None:
        config = replace(config, block_size=block_size)
    if dropout is not None:
        config = replace(config, dropout=dropout)
    if vocab_size is not None:
        config = replace(config, vocab_size=pad_vocab(vocab_size))
    return config


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention` (flash on GPU)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.project(y)

    # The parts around the attention itself, shared with the model server's key/value cache.

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values of `x` `(batch, tokens, 3, heads, head_dim)`: a view, no copy."""
        b, t, c = x.shape
        packed: torch.Tensor = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head)
        return packed

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values `(batch, heads, tokens, head_dim)` (views)."""
        packed = self.packed_qkv(x)
        return (
            packed[:, :, 0].transpose(1, 2),
            packed[:, :, 1].transpose(1, 2),
            packed[:, :, 2].transpose(1, 2),
        )

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """The attention's output `(batch, heads, tokens, head_dim)` projected to `(batch, tokens, width)`."""
        b, _, t, _ = y.shape
        out: torch.Tensor = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))
        return out


class MLP(nn.Module):
    """The 4x-wide GELU feed-forward block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_attention(x, self.attn(self.ln_1(x)))

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block's output from its input and its (projected) attention: both residuals and the MLP."""
        x = x + attended
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT(nn.Module):
    """Decoder-only transformer LM; the output head shares its weight with the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `(batch, seq, vocab)` and, with `targets`, the mean cross-entropy (ignore index -1).

        Without targets only the last position's logits are computed (`(batch, 1, vocab)`), which is all
        generation needs.
        """
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Parameters (tied weights counted once); `non_embedding` leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * layers * width * seq (PaLM, app. B)."""
        t = seq_len or self.config.block_size
        c = self.config
        return 6.0 * self.num_parameters(non_embedding=True) + 12.0 * c.n_layer * c.n_embd * t

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append up to `max_new_tokens` tokens to each row of `idx` (greedy when temperature is 0).

        The context is cropped to `block_size`. Stops early when every row has produced `eos_id`.
        """
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :]
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            if eos_id is not None:
                done |= nxt.squeeze(1) == eos_id
                if bool(done.all()):
                    break
        return idx


def load_for_inference(
    checkpoint_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPT, ByteTokenizer | HFTokenizer, GPTConfig]:
    """Load a Tandem training checkpoint for serving: `(model in eval mode, tokenizer, config)`; the
    tokenizer is the checkpoint's `tokenizer.json` when it carries one (BPE data), else bytes.

    `checkpoint_dir` is one checkpoint (`.../step-00000200`, a `file://` URI works too) or a checkpoint
    root, in which case its newest complete checkpoint is used. Raises `FileNotFoundError` when there is
    no complete checkpoint and `ValueError` when the checkpoint is not a built-in GPT's.
    """
    from tandem.workloads.train import checkpoint as ckpt

    path = ckpt.uri_to_path(str(checkpoint_dir))
    if not (path / ckpt.METADATA_FILE).exists():
        found = ckpt.latest_complete(path)
        if found is None:
            raise FileNotFoundError(f"no complete Tandem checkpoint in {path}")
        path = found.path
    meta = ckpt.read_metadata(path)
    model_meta = meta.get("model")
    if not isinstance(model_meta, dict) or model_meta.get("family") != "gpt":
        raise ValueError(f"{path} is not a built-in GPT checkpoint (metadata model: {model_meta!r})")
    config = GPTConfig.from_dict(model_meta["config"])
    model = GPT(config)
    if (meta.get("fineTuning") or {}).get("lora"):  # adapter-only: base weights + adapter, merged
        from tandem.workloads.models.lora import load_adapter_checkpoint

        load_adapter_checkpoint(model, path, meta)
    else:
        model.load_state_dict(torch.load(path / ckpt.MODEL_FILE, map_location="cpu", weights_only=True))
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.eval()
    # A model trained on a tokenizer's ids is served with that tokenizer: the checkpoint carries it.
    carried = path / "tokenizer.json"
    return model, (HFTokenizer.from_file(carried) if carried.exists() else ByteTokenizer()), config
