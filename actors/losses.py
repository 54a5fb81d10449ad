"""Pure functions: sequence log-probs with response-only masks, DPO/IPO/BT losses, the LR schedule.

Every function here has a hand-computed test in tests/test_losses.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def build_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + response` rows, their attention mask, and a mask over response tokens.

    Prompts keep their last tokens if prompt + 1 response token would not fit; responses are cut at the
    end to fit `max_length`. The response mask is 1 exactly at response positions, so prompt and padding
    never count in a log-prob.
    """
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        p, r = cut_to_fit(p, r, max_length)
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        resp[i, : len(row)] = torch.tensor(m)
    return ids, attn, resp


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log p(token | prefix). logits[:, t] predicts input_ids[:, t+1]."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    token_lp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_lp * mask).sum(-1)


def cut_to_fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """What `build_sequences` keeps of a row: the prompt's last tokens if prompt + 1 response token would not
    fit, the response cut at the end to fit `max_length`."""
    prompt = prompt[-(max_length - 1):] if len(prompt) >= max_length else prompt
    return prompt, response[: max_length - len(prompt)]


def shared_prompt_logprobs(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                           max_length: int) -> torch.Tensor:
    """Summed log-probs of every response of every prompt (`shared_prompt_token_logprobs`, summed)."""
    tokens, mask = shared_prompt_token_logprobs(model, prompts, responses, pad_id, max_length)
    return (tokens * mask).sum(-1)


def shared_prompt_token_logprobs(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response token's log-prob (rows flat over the prompts' responses, in order; padding masked by the
    returned mask), each prompt computed once: the
    prompts run left-padded in one forward, their KV cache is repeated for their responses, which run
    right-padded after it. Equal to `sequence_logprobs` over the full rows (to float precision) at a
    fraction of the compute when prompts are long and have several responses (the n samples of an
    evaluation prompt)."""
    cut = [[cut_to_fit(p, r, max_length) for r in rs] for p, rs in zip(prompts, responses)]
    kept = [c[0][0] if c else p for c, p in zip(cut, prompts)]
    device = next(model.parameters()).device
    ids, mask, positions = left_padded(kept, pad_id, device)
    # logits only at the prompt's last position (the response's first token): the head over the whole prompt
    # would cost a vocabulary-wide product per prompt token, forward and backward, for nothing
    # (an index tensor, not the int 1: the int slices the hidden states to a non-contiguous view, which torch's
    # CPU matmul multiplies as a batch of copies of the whole head, 10x slower than the full product)
    last = torch.tensor([ids.shape[1] - 1], device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=last)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each response's first token
    owner = torch.tensor([i for i, c in enumerate(cut) for _ in c], dtype=torch.long, device=device)
    flat = [r for c in cut for _, r in c]
    if not flat:
        return torch.zeros((0, 1), device=device), torch.zeros((0, 1), device=device)
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    rwidth = max(1, max(len(r) for r in flat))
    rids = torch.full((len(flat), rwidth), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(flat), rwidth), dtype=torch.long)
    for j, r in enumerate(flat):
        rids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[j, : len(r)] = 1
    rids, rmask = rids.to(device), rmask.to(device)
    lengths = mask.sum(-1)[owner]
    positions = lengths[:, None] + torch.arange(rwidth, device=device)[None, :]
    logits = model(input_ids=rids, attention_mask=torch.cat([mask[owner], rmask], dim=1), position_ids=positions,
                   past_key_values=cache, use_cache=True).logits[:, :-1].float()
    rest = torch.gather(F.log_softmax(logits, dim=-1), 2, rids[:, 1:].unsqueeze(-1)).squeeze(-1)
    head = first[owner].gather(1, rids[:, :1])
    return torch.cat([head, rest], dim=1), rmask.to(head.dtype)


def response_token_counts(response_mask: torch.Tensor) -> torch.Tensor:
    """Tokens each row's `sequence_logprobs` sums over (the response's, the first position never predicted)."""
    return response_mask[:, 1:].sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards beta * (log pi - log ref) of chosen and rejected.

    sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h = (pc - rc) - (pr - rr), the log-probs
             summed over each response. eps > 0 is conservative DPO (Mitchell's cDPO), the formula of
             TRL 0.19; TRL 1.x no longer applies label smoothing to this loss. At eps = 0 it equals TRL 1.16's
             sigmoid loss to float precision.
    ipo:     (h - 1 / (2 beta))^2 with each log-ratio divided by its response's token count (`chosen_tokens`,
             `rejected_tokens`), as the IPO authors (arXiv 2310.12036) and TRL define it; the rewards
             reported are then beta times those per-token log-ratios.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the response token counts (chosen_tokens, rejected_tokens): its log-ratios "
                             "are per-token averages")
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1).to(chosen_ratio.dtype)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1).to(rejected_ratio.dtype)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; allowed: sigmoid, ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """-log sigma(r_chosen - r_rejected), the reward-model objective: per pair (`none`), `sum` or `mean`."""
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return {"none": losses, "sum": losses.sum(), "mean": losses.mean()}[reduction]


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `peak`, then cosine to `min_ratio * peak`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)  # the last step (total_steps - 1) is at the floor
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def left_padded(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows left-padded so that every one ends at the last column: ids, attention mask, and position ids
    counted from each row's first real token (so a row computes as it would alone)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


def last_token_logits(model, rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Next-token logits after each row (batch, vocab): the rows left-padded in one forward, only the last
    position's logits computed."""
    ids, mask, positions = left_padded(rows, pad_id, device)
    last = torch.tensor([ids.shape[1] - 1], device=device)  # an index, not the int 1 (shared_prompt_token_logprobs)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=last).logits[:, -1]
