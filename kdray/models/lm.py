"""Next-token prediction over token-id rows: what a causal language model's loss, evaluation and samples share.

A row ``x`` ``[N, T]`` holds token ids, ``-1`` where it is padded (``kdray.data.text``). A causal LM's
logits ``[N, T, V]`` score at position ``t`` the token at ``t + 1``, so the targets are ``x[:, 1:]``
and the last position has none; a target of ``-1`` (padding) is never scored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_sequence(logits: torch.Tensor) -> bool:
    """Per-token logits ``[N, T, V]`` (a causal LM) rather than per-row ``[N, K]``."""
    return logits.dim() == 3


def targets(x: torch.Tensor) -> torch.Tensor:
    """The next token of each position that has one, ``[N, T - 1]`` (int64, ``-1`` where padded)."""
    return x[:, 1:].long()


def token_mask(x: torch.Tensor) -> torch.Tensor:
    """``[N, T - 1]``: True where the position's next token is a real token (not padding)."""
    return x[:, 1:] >= 0


def next_token_nll(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each real next token under ``logits`` ``[N, T, V]``: the mean (or sum) over them."""
    t = targets(x)
    scores = logits[:, : t.shape[1]].float()
    if not bool((t >= 0).any()):
        return scores.sum() * 0.0  # no real target in the batch: 0, still on the graph
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), t.reshape(-1), ignore_index=-1, reduction=reduction)


@torch.no_grad()
def score(logits: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float, int]:
    """(summed NLL, correct top-1, correct top-5, real targets) of a batch: perplexity is exp(NLL / targets)."""
    t = targets(x)
    scores = logits[:, : t.shape[1]].float()
    keep = t >= 0
    if not bool(keep.any()):
        return 0.0, 0.0, 0.0, 0
    s, y = scores[keep], t[keep]
    nll = float(F.cross_entropy(s, y, reduction="sum"))
    top5 = s.topk(min(5, s.shape[-1]), -1).indices
    return nll, float((top5[:, 0] == y).sum()), float((top5 == y[:, None]).any(-1).sum()), int(keep.sum())


@torch.no_grad()
def generate(
    model: nn.Module, prompt: list[int], new_tokens: int, max_len: int, temperature: float = 0.8, seed: int = 0
) -> list[int]:
    """``new_tokens`` ids sampled after ``prompt`` (temperature 0: greedy), reading at most ``max_len`` ids back."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    device = next(iter(model.parameters())).device
    for _ in range(new_tokens):
        window = torch.tensor([ids[-max_len:]], dtype=torch.long, device=device)
        logits = model(window)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        ids.append(nxt)
    model.train(was_training)
    return ids[len(prompt) :]
