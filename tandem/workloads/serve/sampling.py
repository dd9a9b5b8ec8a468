"""Per-sequence logit processing shared by generative runtimes: OpenAI's `logit_bias`, presence and frequency
penalties, and the log-probabilities a request asks for (`logprobs` / `top_logprobs`).

Both functions work on one decoding step's `(batch, vocab)` logits in place and touch only the rows whose
parameters ask for something, so a step without these options costs nothing extra. torch is imported inside
(importing this module stays cheap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tandem.workloads.serve.generation import GenSequence, TokenLogprob

if TYPE_CHECKING:
    import torch

#: Most alternatives reported per token (OpenAI's completions limit; chat's 20 is refused above it).
MAX_TOP_LOGPROBS = 5


def adjust_logits(batch: Sequence[GenSequence], logits: torch.Tensor) -> None:
    """Add each row's `logit_bias`, subtract its presence penalty from every token it has generated and its
    frequency penalty once per time it generated it (OpenAI's definition: over the generated text, not the
    prompt)."""
    import torch

    for i, seq in enumerate(batch):
        params = seq.params
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias, strict=True)
            logits[i, list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        if (params.presence_penalty or params.frequency_penalty) and seq.generated:
            generated = torch.tensor(seq.ids[len(seq.ids) - seq.generated :], device=logits.device)
            counts = torch.bincount(generated, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(
                logits.dtype
            )


def record_logprobs(batch: Sequence[GenSequence], logits: torch.Tensor, chosen: Sequence[int]) -> None:
    """For each row that asks for log-probabilities, the chosen token's and the most likely ones', on the
    row's `logprob` (the scheduler hands them to the request with the token)."""
    import torch

    wanted = [i for i, seq in enumerate(batch) if seq.params.logprobs is not None]
    if not wanted:
        return
    logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)
    top_k = min(max(batch[i].params.logprobs or 0 for i in wanted), MAX_TOP_LOGPROBS)
    top_values, top_ids = logprobs.topk(top_k, dim=-1) if top_k else (None, None)
    picked = logprobs[torch.arange(len(wanted)), torch.tensor([chosen[i] for i in wanted])].tolist()
    tops_values = top_values.tolist() if top_values is not None else None
    tops_ids = top_ids.tolist() if top_ids is not None else None
    for row, i in enumerate(wanted):
        count = batch[i].params.logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if count and tops_ids is not None and tops_values is not None:
            top = tuple(zip(tops_ids[row][:count], tops_values[row][:count], strict=True))
        batch[i].logprob = TokenLogprob(int(chosen[i]), float(picked[row]), top)
