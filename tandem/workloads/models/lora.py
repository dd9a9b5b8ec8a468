"""LoRA (Hu et al., 2021) for the built-in GPT: frozen linear layers plus a trainable low-rank update.

`apply_lora(model, ...)` freezes every weight and wraps the chosen linear layers of each block in a
`LoRALinear` (y = W x + b + scale * B A dropout(x), B starting at zero, so the wrapped model computes
exactly what the base does until it trains). `adapter_state` / `load_adapter_state` are what an
adapter-only checkpoint holds; `merge_lora` folds the update into plain `nn.Linear` layers for serving
(no extra matmuls per token). `load_adapter_checkpoint` is the serving side: base weights from the
checkpoint the adapter names, then the adapter, merged.

Why not `peft`: it needs `transformers`-style configs and module discovery for a model that is ours and
has four linear layers per block; the whole technique here is one small module, tested against the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

#: The adapter-only checkpoint's weights file (instead of the model's `model.pt`).
ADAPTER_FILE: Final = "adapter.pt"
#: Parameter names of the update inside a wrapped layer.
_A, _B = "lora_a", "lora_b"


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus `scale * B A` on its (dropped-out) input."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        weight = base.weight
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and the LoRA paper's code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_a), self.lora_b)
        out: torch.Tensor = self.base(x) + update * self.scale
        return out

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function (the update folded into its weight)."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        merged.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, qualified name) of every linear layer matching a target suffix."""
    found = []
    for name, _ in model.named_modules():
        for target in targets:
            if name.endswith("." + target) or name == target:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                found.append((parent, attr, name))
    return found


def apply_lora(
    model: nn.Module, targets: Sequence[str], *, rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Freeze `model` and wrap each target linear layer in a `LoRALinear`; the wrapped names.

    Raises `ValueError` naming the targets that match no linear layer.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found = _targets(model, targets)
    missing = [t for t in targets if not any(name.endswith(t) for _, _, name in found)]
    if missing:
        raise ValueError(f"no linear layer named {', '.join(missing)} in the model")
    for parent, attr, name in found:
        layer = getattr(parent, attr)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a linear layer")
        setattr(parent, attr, LoRALinear(layer, rank, alpha, dropout))
    return [name for _, _, name in found]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only (what an adapter-only checkpoint stores), by parameter name."""
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if name.endswith("." + _A) or name.endswith("." + _B)
    }


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an adapter state into a model wrapped the same way; `ValueError` when the names differ."""
    params = dict(model.named_parameters())
    mine = {n for n in params if n.endswith("." + _A) or n.endswith("." + _B)}
    if mine != set(state):
        raise ValueError(
            f"adapter does not fit the model: missing {sorted(mine - set(state))[:4]}, "
            f"unexpected {sorted(set(state) - mine)[:4]} (rank or target modules changed?)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` in `model` by its merged `nn.Linear` (in place); returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.merged())
    return model


def base_checkpoint_path(uri: str) -> Path:
    """A local path for the base checkpoint an adapter names (`file://` as is, `s3://` downloaded)."""
    from tandem.workloads.storage import materialize

    return materialize(uri, what="the adapter's base checkpoint (metadata.json fineTuning.base.uri)")


def load_adapter_checkpoint(model: nn.Module, path: Path, meta: Mapping[str, Any]) -> nn.Module:
    """Load a LoRA checkpoint's base weights and adapter into `model` (a GPT of the base's shape), merged.

    `meta` is the checkpoint's metadata: `fineTuning.base.uri` names the base checkpoint (itself loaded
    with `load_for_inference`, so a base may be a fine-tune too), `fineTuning.lora` the adapter's shape.
    Raises `FileNotFoundError` when the base is gone, `ValueError` when it does not fit.
    """
    from tandem.workloads.models.gpt import load_for_inference

    tuning = meta["fineTuning"]
    base_uri, lora = tuning["base"]["uri"], tuning["lora"]
    base_path = base_checkpoint_path(base_uri)
    if not base_path.exists():
        raise FileNotFoundError(
            f"the adapter at {path} was trained on the base checkpoint {base_uri}, which is not at "
            f"{base_path}: serve it where its base is readable (the same volume as in training)"
        )
    base, _, _ = load_for_inference(base_path)
    model.load_state_dict(base.state_dict())
    apply_lora(model, lora["targetModules"], rank=lora["rank"], alpha=lora["alpha"])
    load_adapter_state(model, torch.load(path / ADAPTER_FILE, map_location="cpu", weights_only=True))
    return merge_lora(model)


def lineage(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A served checkpoint's fine-tuning, flat for a server's model metadata: `fine_tuning` (lora/full),
    `base_checkpoint`, `base_step`, `base_training_job`, `lora_rank`; {} for a model trained from scratch."""
    from tandem.workloads.train import checkpoint as ckpt

    path = ckpt.uri_to_path(str(checkpoint_dir))
    if not (path / ckpt.METADATA_FILE).exists():
        found = ckpt.latest_complete(path, check=False)
        if found is None:
            return {}
        path = found.path
    tuning = ckpt.read_metadata(path).get("fineTuning")
    if not isinstance(tuning, dict):
        return {}
    base = tuning.get("base") or {}
    out = {
        "fine_tuning": tuning.get("method"),
        "base_checkpoint": base.get("uri"),
        "base_step": base.get("step"),
        "base_training_job": base.get("trainingJob"),
        "lora_rank": (tuning.get("lora") or {}).get("rank"),
    }
    return {k: v for k, v in out.items() if v is not None}
