"""Greedy decoding for the causal tasks: with a KV cache where the model takes one, else
through ``model(input_ids=..., attention_mask=...).logits`` alone (a split model)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

__all__ = ["greedy_decode"]


def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuation of each (non-empty) prompt, up to ``max_new_tokens`` or eos.

    A transformers model whose forward takes ``past_key_values`` (or PEFT around one) decodes
    with a KV cache (:func:`_greedy_cached`, the same tokens at a fraction of the cost).
    Any other model (a split model) is used through ``model(input_ids=...,
    attention_mask=...).logits`` only: right-padded, no KV
    cache: every step runs the whole batch (B, T) and reads each row's logits at its own
    last real token, then writes the new token just after it. Real tokens never attend to
    the padding after them, so no row sees another's padding and positions stay 0..len-1
    (as in training). A row's output ends with eos when it produced one.
    """
    rows = len(prompts)
    if rows == 0:
        return []
    if _accepts_cache(model):
        return _greedy_cached(model, prompts, max_new_tokens, eos_id, pad_id, device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max()) + max_new_tokens
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        mask[r, : len(p)] = 1
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    arange = torch.arange(rows, device=device)
    for _ in range(max_new_tokens):
        upto = int(lengths.max())
        logits = model(input_ids=ids[:, :upto], attention_mask=mask[:, :upto]).logits
        next_ids = logits[arange, lengths - 1].argmax(-1)
        live = ~done
        ids[arange[live], lengths[live]] = next_ids[live]
        mask[arange[live], lengths[live]] = 1
        for r in arange[live].tolist():
            generated[r].append(int(next_ids[r]))
        lengths = lengths + live.long()
        done = done | (next_ids == eos_id)
        if bool(done.all()):
            break
    return generated


def _accepts_cache(model: torch.nn.Module) -> bool:
    """A transformers model (or PEFT around one) whose forward takes a KV cache."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return isinstance(model, PreTrainedModel) and (
        "past_key_values" in inspect.signature(model.forward).parameters)


def _greedy_cached(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """:func:`greedy_decode` with a KV cache: prompts left-padded, positions counted over
    real tokens only (0..len-1, as in training), then one new token per row and step."""
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)
        for r in (~done).nonzero().flatten().tolist():
            generated[r].append(int(next_ids[r]))
        done = done | (next_ids == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return generated

