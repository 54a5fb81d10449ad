"""Pure functions: sequence log-probs with response-only masks, DPO/IPO/BT losses, the LR schedule.

Every function here has a hand-computed test in tests/test_losses.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

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


PACKED_ROW_TOKENS = 256
"""Token positions a packed row aims at (`pack_responses`): rows of a few hundred keep each layer's attention matrix
(quadratic in the row) small against its linear layers while the padding stays below one prompt's length."""


def shared_prompt_logprobs(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                           max_length: int, packed: bool | Packed = True) -> torch.Tensor:
    """Summed log-probs of every response of every prompt (`shared_prompt_token_logprobs`, summed)."""
    tokens, mask = shared_prompt_token_logprobs(model, prompts, responses, pad_id, max_length, packed)
    return (tokens * mask).sum(-1)


def shared_prompt_token_logprobs(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                                 max_length: int, packed: bool | Packed = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response token's log-prob (rows flat over the prompts' responses, in order; padding masked by the
    returned mask), equal to `sequence_logprobs` over the full rows (to float precision). Packed (the default,
    `pack_responses`), each prompt is computed once for all its responses; a `Packed` given is that packing
    of these prompts and responses, made once for several models; `packed=False` runs each response in its
    own full row with its prompt (for a model whose attention does not take a 4D mask: `packing_is_exact`)."""
    if isinstance(packed, Packed):
        return packed_token_logprobs(model, packed)
    if packed:
        return packed_token_logprobs(model, pack_responses(prompts, responses, pad_id, max_length))
    rows = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    device = next(model.parameters()).device
    if not rows:
        return torch.zeros((0, 1), device=device), torch.zeros((0, 1), device=device)
    ids, attn, resp = (t.to(device) for t in build_sequences([p for p, _ in rows], [r for _, r in rows], pad_id,
                                                              max_length))
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    tokens = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = resp[:, 1:].to(tokens.dtype)
    # each response's tokens from its first column, as the packed form returns them
    width = max(1, max(len(cut_to_fit(p, r, max_length)[1]) for p, r in rows))
    tokens, mask = F.pad(tokens * mask, (0, width)), F.pad(mask, (0, width))  # a short row's columns past its end
    index = (resp.argmax(-1) - 1).clamp(min=0)[:, None] + torch.arange(width, device=device)[None, :]
    return tokens.gather(1, index), mask.gather(1, index)


@dataclass
class Packed:
    """Prompts and their responses laid out for one forward (`pack_responses`). Each row holds whole prompts
    with all their responses; which token sees which is the 4D mask `allowed`, where it sits in its sequence is
    `positions`, so the order of tokens within a row is free: the positions whose logits are read (a prompt's
    last token, every response token but the last) come first, in the row's first `keep` columns."""
    ids: torch.Tensor        # (rows, width) token ids, padding where unused
    positions: torch.Tensor  # (rows, width) each token's position in its own prompt + response
    group: torch.Tensor      # (rows, width) which prompt a token belongs to (padding: a group of its own)
    branch: torch.Tensor     # (rows, width) which of its prompt's responses (-1: the prompt's own tokens)
    keep: int                # columns whose logits are read
    source: torch.Tensor     # per response token: the flat (row * keep + column) logits that predict it
    target: torch.Tensor     # per response token: its id
    dest: torch.Tensor       # per response token: its flat index in the (responses, width) result
    responses: int           # rows of the result: every response, in order
    width: int               # columns of the result: the longest response
    masks: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> `attention_mask`, built once

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(rows, 1, width, width) on `device`: True where a query position may attend a key position (same
        prompt, not later, and the prompt's own tokens or the same response)."""
        g, b, q = (t.to(device) for t in (self.group, self.branch, self.positions))
        ok = g[:, :, None] == g[:, None, :]
        ok &= q[:, None, :] <= q[:, :, None]
        ok &= (b[:, None, :] == -1) | (b[:, None, :] == b[:, :, None])
        return ok[:, None]

    def attention_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as an additive mask: 0 where attended, the dtype's lowest elsewhere (eager adds it, sdpa
        takes a float mask as such); built on the model's device once per device and dtype (a policy and its
        reference share it)."""
        key = (str(device), dtype)
        if key not in self.masks:
            allowed = self.allowed(device)
            self.masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)
        return self.masks[key]


def pack_responses(prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int, max_length: int,
                   row_tokens: int = PACKED_ROW_TOKENS) -> Packed:
    """Each prompt once, followed by its responses, each response attending to the prompt and to itself only
    (the prompt's KV shared without a cache to copy); a response's last token is only a target, never an input.
    Prompts with their responses are spread over ceil(tokens / max(`row_tokens`, the largest prompt with its
    responses)) rows, longest first onto the shortest row, so rows end near-equal and padding is small; a
    prompt is never split (so one long prompt does not widen many rows of short ones)."""
    units, flat = [], []  # units: (predicting tokens, other tokens) as (id, position, branch)
    for p, rs in zip(prompts, responses):
        cut = [cut_to_fit(p, r, max_length) for r in rs]
        if not any(r for _, r in cut):  # no response token to predict: the prompt is not computed
            flat.extend((None, [], []) for _ in cut)
            continue
        kept = cut[0][0]
        if not kept:
            raise ValueError("a prompt with no tokens: nothing predicts its responses' first tokens")
        n = len(kept)
        reading = [(kept[-1], n - 1, -1)]  # the prompt's last token predicts every response's first
        for j, (_, r) in enumerate(cut):
            flat.append((len(units), [0] + [len(reading) + k for k in range(len(r) - 1)], r))
            reading.extend((t, n + k, j) for k, t in enumerate(r[:-1]))
        units.append((reading, [(t, i, -1) for i, t in enumerate(kept[:-1])]))
    sizes = [len(a) + len(b) for a, b in units]
    count = max(1, min(len(units), math.ceil(sum(sizes) / max([row_tokens, *sizes]))))
    rows: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for u in sorted(range(len(units)), key=lambda u: -sizes[u]):
        k = load.index(min(load))
        rows[k].append(u)
        load[k] += sizes[u]
    keep = max(1, max(sum(len(units[u][0]) for u in row) for row in rows))
    width = keep + max(sum(len(units[u][1]) for u in row) for row in rows)
    cells = [[(pad_id, 0, -2 - r * width - c, -1) for c in range(width)] for r in range(count)]  # padding: alone
    start = {}
    for r, row in enumerate(rows):
        a, b = 0, keep
        for u in row:
            reading, other = units[u]
            start[u] = (r, a)
            for t, q, j in reading:
                cells[r][a] = (t, q, u, j)
                a += 1
            for t, q, j in other:
                cells[r][b] = (t, q, u, j)
                b += 1
    table = torch.tensor(cells, dtype=torch.long).view(count, width, 4)
    source, target, dest = [], [], []
    out_width = max(1, max((len(r) for _, _, r in flat), default=1))
    for j, (u, reads, r) in enumerate(flat):
        row, a = start.get(u, (0, 0))  # an empty response has no token to place
        for k, t in enumerate(r):
            source.append(row * keep + a + reads[k])
            target.append(t)
            dest.append(j * out_width + k)
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return Packed(ids=table[..., 0], positions=table[..., 1], group=table[..., 2], branch=table[..., 3], keep=keep,
                  source=as_long(source), target=as_long(target), dest=as_long(dest), responses=len(flat),
                  width=out_width)


def packed_token_logprobs(model, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `packed`'s rows: each response token's log-prob and the mask of real tokens, (responses,
    width) as `shared_prompt_token_logprobs` returns them. The output head runs only on the first `keep`
    columns (an index tensor, not an int: `last_token_logits`), the log-softmax only on the positions read."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if packed.source.numel() == 0:  # no response, or only empty ones
        return (torch.zeros((packed.responses, packed.width), device=device),
                torch.zeros((packed.responses, packed.width), device=device))
    logits = model(input_ids=packed.ids.to(device), attention_mask=packed.attention_mask(device, dtype),
                   position_ids=packed.positions.to(device),
                   use_cache=False, logits_to_keep=torch.arange(packed.keep, device=device)).logits
    logits = logits[:, : packed.keep]  # a model that ignores logits_to_keep returns every column
    read, which = torch.unique(packed.source.to(device), return_inverse=True)
    logps = F.log_softmax(logits.reshape(-1, logits.shape[-1])[read].float(), dim=-1)
    values = logps[which, packed.target.to(device)]
    dest = packed.dest.to(device)
    size = packed.responses * packed.width
    tokens = torch.zeros(size, dtype=values.dtype, device=device).index_put((dest,), values)
    real = torch.zeros(size, dtype=values.dtype, device=device).index_fill_(0, dest, 1.0)
    return tokens.view(packed.responses, packed.width), real.view(packed.responses, packed.width)


def needed_positions(prompts: list[list[int]], responses: list[list[list[int]]], max_length: int) -> tuple[int, int]:
    """What computing these responses' log-probs needs, in whatever form: token positions (each prompt once, each
    response but its last token) and positions whose logits are read (a prompt's last token, each response
    token but the last); `pack_responses` computes exactly these plus padding."""
    real = head = 0
    for p, rs in zip(prompts, responses):
        cut = [cut_to_fit(p, r, max_length) for r in rs]
        if any(r for _, r in cut):
            inputs = sum(max(0, len(r) - 1) for _, r in cut)
            real += len(cut[0][0]) + inputs
            head += 1 + inputs
    return real, head


def packing_is_exact(model) -> bool:
    """Whether `model` computes packed rows as `pack_responses` means them: two probe prompts of 8 ordinary
    tokens with two responses of 6 each, packed one prompt a row.
    - Nothing crosses between responses: each response's log-probs stay the same (within 1e-4) when the other
      response's tokens change, in any dtype (a masked key adds exactly nothing; a response that saw the other
      moves by 0.04 on odpo's tiny random policy in bfloat16, 1.7-3.6 on SmolLM2-135M).
    - Positions and the mask as meant: every token's log-prob equal to full rows' within 1e-3 in float32, 0.5
      in a 16-bit dtype (packing's own rounding: at most 1e-4 and 0.2 on SmolLM2, eager and sdpa).
    A model that rejects the packing's arguments fails the probe instead of stopping the run."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)

    def ids(k: int) -> list[int]:
        return torch.randint(min(1000, vocab // 4), min(20000, vocab), (k,), generator=g).tolist()

    prompts = [ids(8), ids(8)]
    responses = [[ids(6), ids(6)], [ids(6), ids(6)]]
    other = [[rs[0], ids(6)] for rs in responses]  # the second responses changed
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.5
    try:
        with torch.no_grad():
            packed, pm = packed_token_logprobs(model, pack_responses(prompts, responses, 0, 64, row_tokens=1))
            changed, _ = packed_token_logprobs(model, pack_responses(prompts, other, 0, 64, row_tokens=1))
            rows, rm = shared_prompt_token_logprobs(model, prompts, responses, 0, 64, packed=False)
    except (TypeError, ValueError, RuntimeError):  # the model takes no 4D mask, position ids or logits_to_keep
        return False
    apart = float((packed[0::2] - changed[0::2]).abs().max()) <= 1e-4
    return bool(apart and torch.equal(pm, rm) and ((packed - rows).abs() * pm).max() <= tolerance)


def sliding_window_binds(config, max_length: int) -> bool:
    """Whether a layer of this model attends only to a window shorter than `max_length` (Mistral's, Gemma's
    local layers): the packing's 4D mask would replace that window, so such a model gets full rows."""
    configs = [config, getattr(config, "text_config", None)]
    windows = [getattr(c, "sliding_window", None) for c in configs if c is not None]
    used = [getattr(c, "use_sliding_window", True) for c in configs if c is not None]
    return any(w is not None and w < max_length for w in windows) and all(used)


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
