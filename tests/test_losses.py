"""Hand-computed checks of actors/losses.py: DPO/IPO/BT losses, sequence building, log-probs, LR schedule.

Every expected value is written out with math.log / math.exp on small numbers, never by calling the
function under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch

from actors.losses import (
    bradley_terry_loss,
    build_sequences,
    cosine_lr,
    cut_to_fit,
    dpo_loss,
    sequence_logprobs,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def neg_log_sigmoid(x: float) -> float:
    """-log sigma(x) = log(1 + exp(-x)), written out by hand."""
    return math.log(1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# dpo_loss


def test_dpo_sigmoid_single_pair_by_hand():
    pc, pr, rc, rr, beta = -1.0, -2.0, -1.5, -1.5, 0.1
    # h = (pc - rc) - (pr - rr) = 0.5 - (-0.5) = 1.0
    expected = -math.log(1.0 / (1.0 + math.exp(-beta * 1.0)))  # -log sigma(0.1) = log(1 + e^-0.1)

    losses, chosen_reward, rejected_reward = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert chosen_reward.item() == pytest.approx(0.1 * 0.5, abs=1e-12)  # beta * (pc - rc)
    assert rejected_reward.item() == pytest.approx(0.1 * -0.5, abs=1e-12)  # beta * (pr - rr)


def test_dpo_sigmoid_batch_of_two_pairs_by_hand():
    beta = 0.1
    # pair 0: h = (-1 + 1.5) - (-2 + 1.5) = 1.0 ; pair 1: h = (-3 + 2) - (-1 + 2) = -2.0
    pc, pr, rc, rr = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.shape == (2,)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-12)
    # a pair the policy prefers the wrong way costs more than one it prefers the right way
    assert losses[1] > losses[0]
    assert chosen_reward.tolist() == pytest.approx([0.1 * 0.5, 0.1 * -1.0])
    assert rejected_reward.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 1.0])


def test_dpo_label_smoothing_by_hand():
    pc, pr, rc, rr, beta, eps = -1.0, -2.0, -1.5, -1.5, 0.1, 0.1  # h = 1.0, beta * h = 0.1
    log_sig_pos = math.log(1 / (1 + math.exp(-0.1)))
    log_sig_neg = math.log(1 / (1 + math.exp(0.1)))
    expected = -(1 - eps) * log_sig_pos - eps * log_sig_neg
    losses, _, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta, label_smoothing=eps)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # smoothing penalises confidence: it costs more than plain DPO on a correctly ordered pair
    plain = math.log(1 + math.exp(-0.1))
    assert losses.item() > plain


def test_dpo_ipo_by_hand():
    # h = 1.0 and h = -2.0 as in the batch test, one-token responses (the per-token average is the sum)
    pc, pr, rc, rr = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)
    one = {"chosen_tokens": t(1.0, 1.0), "rejected_tokens": t(1.0, 1.0)}
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", **one)
    # 1 / (2 * 0.1) = 5: (1 - 5)^2 = 16, (-2 - 5)^2 = 49
    assert losses.tolist() == pytest.approx([16.0, 49.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo", **one)
    # 1 / (2 * 0.25) = 2: (1 - 2)^2 = 1, (-2 - 2)^2 = 16
    assert losses.tolist() == pytest.approx([1.0, 16.0])
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", **one)
    # 1 / (2 * 0.5) = 1: the pair with h = 1 sits exactly at the IPO target
    assert losses.tolist() == pytest.approx([0.0, 9.0])
    assert chosen_reward.tolist() == pytest.approx([0.5 * 0.5, 0.5 * -1.0])
    assert rejected_reward.tolist() == pytest.approx([0.5 * -0.5, 0.5 * 1.0])


def test_dpo_at_h_zero_is_log2_and_gradients_are_opposite():
    beta = 0.1
    pc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    rc, rr = t(-1.0), t(-2.0)  # policy == reference: h = 0
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.item() == pytest.approx(math.log(2.0), abs=1e-12)
    assert losses.item() == pytest.approx(0.6931471805599453, abs=1e-12)
    assert chosen_reward.item() == 0.0 and rejected_reward.item() == 0.0
    # the implicit rewards are metrics: detached from the graph
    assert not chosen_reward.requires_grad and not rejected_reward.requires_grad
    losses.sum().backward()
    # d/d pc [-log sigma(beta h)] = -beta * sigma(-beta h) = -0.1 * 0.5 at h = 0
    assert pc.grad.item() == pytest.approx(-0.05, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.05, abs=1e-12)
    assert pc.grad.item() == pytest.approx(-pr.grad.item(), abs=1e-15)


def test_dpo_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), 0.1, loss_type="hinge")


def test_ipo_averages_each_log_ratio_over_its_response_tokens_by_hand():
    """IPO as its authors and TRL define it: each sequence's log-ratio divided by its response token count."""
    # chosen: 4 tokens, log-ratio (pc - rc) = -2.0 - (-4.0) = 2.0 -> 0.5 per token
    # rejected: 2 tokens, log-ratio (pr - rr) = -3.0 - (-2.0) = -1.0 -> -0.5 per token
    pc, rc, pr, rr, beta = t(-2.0), t(-4.0), t(-3.0), t(-2.0), 0.5
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta, "ipo",
                                                      chosen_tokens=t(4.0), rejected_tokens=t(2.0))
    h = 2.0 / 4 - (-1.0 / 2)  # = 1.0, exactly the target 1 / (2 beta) = 1: no loss
    assert losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-15)
    assert losses.item() == pytest.approx(0.0, abs=1e-15)
    # summed over the response instead, h = 2 - (-1) = 3 and the loss would be (3 - 1)^2 = 4
    summed, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_tokens=t(1.0), rejected_tokens=t(1.0))
    assert summed.item() == pytest.approx(4.0, abs=1e-12)
    # the implicit rewards reported are beta times the averaged log-ratios
    assert chosen_reward.item() == pytest.approx(0.5 * 0.5, abs=1e-15)
    assert rejected_reward.item() == pytest.approx(0.5 * -0.5, abs=1e-15)


def test_ipo_gradient_by_hand_with_unequal_lengths():
    beta = 0.1
    pc = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rc, rr, nc, nr = t(-2.0), t(-3.0), 4.0, 2.0  # policy == reference: h = 0
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_tokens=t(nc), rejected_tokens=t(nr))
    assert losses.item() == pytest.approx((0 - 5.0) ** 2, abs=1e-12)  # 1 / (2 beta) = 5
    losses.sum().backward()
    # d/d pc (h - 5)^2 = 2 (h - 5) / nc = -10 / 4 ; d/d pr = -2 (h - 5) / nr = 10 / 2
    assert pc.grad.item() == pytest.approx(-2.5, abs=1e-12)
    assert pr.grad.item() == pytest.approx(5.0, abs=1e-12)
    # summed log-ratios would push both sequences equally hard (-10, +10): the lengths matter
    assert abs(pc.grad.item()) != pytest.approx(abs(pr.grad.item()))


def test_ipo_without_token_counts_is_refused():
    with pytest.raises(ValueError, match="ipo needs the response token counts"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), 0.1, loss_type="ipo")


def test_bradley_terry_per_pair_and_mean_by_hand():
    chosen, rejected = t(2.0, 0.5), t(1.0, 1.5)  # differences +1 and -1
    per_pair = bradley_terry_loss(chosen, rejected, reduction="none")
    assert per_pair.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))], abs=1e-12)
    assert bradley_terry_loss(chosen, rejected, reduction="sum").item() == pytest.approx(sum(per_pair.tolist()))


# ---------------------------------------------------------------------------------------------
# bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    chosen, rejected = t(2.0, 0.5), t(1.0, 1.5)  # differences +1 and -1
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# build_sequences


def test_build_sequences_pads_right_and_masks_responses_only():
    ids, attn, resp = build_sequences([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0, max_length=10)
    assert ids.dtype == torch.long and attn.dtype == torch.long and resp.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert resp.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_build_sequences_cuts_response_to_max_length():
    ids, attn, resp = build_sequences([[1, 2, 3]], [[4, 5, 6, 7]], pad_id=0, max_length=5)
    assert ids.tolist() == [[1, 2, 3, 4, 5]]
    assert attn.tolist() == [[1, 1, 1, 1, 1]]
    assert resp.tolist() == [[0, 0, 0, 1, 1]]


def test_build_sequences_long_prompt_keeps_last_tokens_and_one_response_token():
    # prompt of 6 > max_length 4: keep its last 3 tokens, then 1 response token
    ids, attn, resp = build_sequences([[1, 2, 3, 4, 5, 6]], [[7, 8]], pad_id=0, max_length=4)
    assert ids.tolist() == [[4, 5, 6, 7]]
    assert attn.tolist() == [[1, 1, 1, 1]]
    assert resp.tolist() == [[0, 0, 0, 1]]
    # a prompt of exactly max_length tokens also leaves room for one response token
    ids, _, resp = build_sequences([[1, 2, 3, 4]], [[7, 8]], pad_id=0, max_length=4)
    assert ids.tolist() == [[2, 3, 4, 7]]
    assert resp.tolist() == [[0, 0, 0, 1]]
    # a prompt of max_length - 1 tokens is kept whole
    ids, _, resp = build_sequences([[1, 2, 3]], [[7, 8]], pad_id=0, max_length=4)
    assert ids.tolist() == [[1, 2, 3, 7]]
    assert resp.tolist() == [[0, 0, 0, 1]]


def test_build_sequences_mixed_truncation_in_one_batch_uses_pad_id():
    ids, attn, resp = build_sequences([[1, 2, 3, 4, 5], [6]], [[7, 8], [9]], pad_id=99, max_length=4)
    assert ids.tolist() == [[3, 4, 5, 7], [6, 9, 99, 99]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert resp.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# sequence_logprobs


def _hand_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Batch 1, length 5, vocab 3: prompt [0, 1], response [2, 1], then one padding position.

    logits[:, t] predicts input_ids[:, t + 1]; the response mask is read at the target position, so
    logits[:, 1] (-> id 2) and logits[:, 2] (-> id 1) count; logits[:, 0] predicts a prompt token,
    logits[:, 3] predicts padding, logits[:, 4] predicts nothing.
    """
    input_ids = torch.tensor([[0, 1, 2, 1, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 0]])
    logits = torch.zeros(1, 5, 3, dtype=torch.float64)
    logits[0, 1] = torch.tensor([0.0, 0.0, 2.0])
    logits[0, 2] = torch.tensor([1.0, 3.0, 0.0])
    expected = (2.0 - math.log(math.exp(0.0) + math.exp(0.0) + math.exp(2.0))) + (
        3.0 - math.log(math.exp(1.0) + math.exp(3.0) + math.exp(0.0))
    )
    return logits, input_ids, response_mask, expected


def test_sequence_logprobs_by_hand():
    logits, input_ids, response_mask, expected = _hand_logits()
    out = sequence_logprobs(logits, input_ids, response_mask)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-6)
    # log p(2 | [2.0 at id 2]) = 2 - log(2 + e^2); log p(1 | [1, 3, 0]) = 3 - log(e + e^3 + 1)
    assert out.item() == pytest.approx(
        math.log(math.exp(2) / (2 + math.exp(2))) + math.log(math.exp(3) / (math.e + math.exp(3) + 1)), abs=1e-6)


def test_sequence_logprobs_ignores_prompt_and_padding_positions():
    logits, input_ids, response_mask, expected = _hand_logits()
    for position in (0, 3, 4):  # predicts a prompt token, predicts padding, predicts nothing
        changed = logits.clone()
        changed[0, position] = torch.tensor([5.0, -4.0, 7.0])
        out = sequence_logprobs(changed, input_ids, response_mask)
        assert out.item() == pytest.approx(expected, abs=1e-6), position


def test_sequence_logprobs_changes_with_a_response_predicting_position():
    logits, input_ids, response_mask, expected = _hand_logits()
    changed = logits.clone()
    changed[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # now p(id 2) = 1/3 instead of e^2 / (2 + e^2)
    out = sequence_logprobs(changed, input_ids, response_mask)
    new_expected = math.log(1 / 3) + (3.0 - math.log(math.exp(1.0) + math.exp(3.0) + 1.0))
    assert out.item() == pytest.approx(new_expected, abs=1e-6)
    assert out.item() != pytest.approx(expected, abs=1e-3)


def test_sequence_logprobs_with_build_sequences_counts_each_response_token_once():
    # uniform logits: every response token has log-prob -log V, prompt and padding contribute nothing
    vocab = 16
    ids, _, resp = build_sequences([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0, max_length=10)
    logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
    out = sequence_logprobs(logits, ids, resp)
    assert out.tolist() == pytest.approx([-2 * math.log(16), -3 * math.log(16)], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# cosine_lr


def test_cosine_lr_linear_warmup():
    peak = 2.0
    # warmup 4 steps: peak * (step + 1) / 4
    assert cosine_lr(0, 20, 4, peak) == pytest.approx(0.5)
    assert cosine_lr(1, 20, 4, peak) == pytest.approx(1.0)
    assert cosine_lr(2, 20, 4, peak) == pytest.approx(1.5)
    assert cosine_lr(3, 20, 4, peak) == pytest.approx(2.0)  # last warmup step reaches the peak


def test_cosine_lr_end_of_warmup_and_halfway():
    peak, min_ratio = 2.0, 0.1
    # the first step after warmup runs at the peak
    assert cosine_lr(2, 12, 2, peak, min_ratio) == pytest.approx(peak)
    # Halfway and a quarter of the way through a long decay (warmup 2, 4000 decay steps). The long decay
    # makes these checks hold whether the decay counts total - warmup or total - warmup - 1 intervals
    # (whether the floor is reached at step `total_steps` or at the last step `total_steps - 1`, which
    # test_cosine_lr_last_step_reaches_the_floor pins down): the difference is < 1e-4 relative here.
    # halfway: cos(pi / 2) = 0 -> peak * (min + (1 - min) * 0.5) = 2 * 0.55 = 1.1
    assert cosine_lr(2 + 2000, 4002, 2, peak, min_ratio) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5), rel=1e-3)
    assert cosine_lr(2 + 2000, 4002, 2, peak, min_ratio) == pytest.approx(1.1, rel=1e-3)
    # a quarter: cos(pi / 4) = sqrt(2) / 2 -> 2 * (0.1 + 0.45 * (1 + 0.7071...)) = 1.7364...
    assert cosine_lr(2 + 1000, 4002, 2, peak, min_ratio) == pytest.approx(
        2.0 * (0.1 + 0.9 * 0.5 * (1 + math.sqrt(2) / 2)), rel=1e-3)
    # three quarters: cos(3 pi / 4) = -sqrt(2) / 2 -> 2 * (0.1 + 0.45 * 0.2929...) = 0.4636...
    assert cosine_lr(2 + 3000, 4002, 2, peak, min_ratio) == pytest.approx(
        2.0 * (0.1 + 0.9 * 0.5 * (1 - math.sqrt(2) / 2)), rel=1e-3)


def test_cosine_lr_last_step_reaches_the_floor():
    # Steps are 0-based: a round of 12 optimizer steps runs steps 0..11 (actors/learner.py passes
    # step_in_round = 0 .. total_steps - 1), so the last step the learner takes is 11.
    peak, min_ratio = 2.0, 0.1
    assert cosine_lr(11, 12, 2, peak, min_ratio) == pytest.approx(0.1 * 2.0)
    assert cosine_lr(9, 10, 0, 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_cosine_lr_decay_is_monotone_and_stays_above_the_floor():
    peak, min_ratio = 2.0, 0.1
    values = [cosine_lr(s, 12, 2, peak, min_ratio) for s in range(2, 12)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(v >= 0.2 - 1e-12 for v in values)
    # past the end of the schedule it stays at the floor
    assert cosine_lr(30, 12, 2, peak, min_ratio) == pytest.approx(0.2)


def test_cosine_lr_without_warmup_starts_at_peak():
    assert cosine_lr(0, 10, 0, 3e-4) == pytest.approx(3e-4)
    assert cosine_lr(0, 10, 0, 3e-4, 0.5) == pytest.approx(3e-4)


class Wrapped(torch.nn.Module):
    """A model behind a forward that changes what reaches it: stands in for a model whose attention or head
    does not take what packing passes (a fault injected, not a model of odpo's)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


class DropsTheMask(Wrapped):  # a 4D mask and the positions never reach the model
    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return self.inner(input_ids=input_ids, attention_mask=mask, **kwargs)


class SeesTheOtherResponse(Wrapped):  # the mask keeps causality by position, not prompts or responses
    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask.dim() == 2:  # full rows: nothing to see
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        order = position_ids[:, None, :] <= position_ids[:, :, None]
        mask = torch.zeros(order.shape, dtype=attention_mask.dtype).masked_fill_(~order, attention_mask.min())
        return self.inner(input_ids=input_ids, attention_mask=mask[:, None], position_ids=position_ids, **kwargs)


class IgnoresPositions(Wrapped):  # the mask arrives, the position ids do not
    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


class IgnoresLogitsToKeep(Wrapped):  # logits for every column, whatever logits_to_keep asked
    def forward(self, logits_to_keep=None, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_logprobs_equal_the_full_rows(tiny_policy_dir, attention):
    """Each prompt computed once with its responses packed after it under a 4D mask (prompts of unequal length,
    1-3 responses each, a prompt with none, a one-token and an empty response, rows cut to max_length, one row
    or a row per prompt, a model that returns logits for every column): the same log-probs, token by token, as
    full rows; and the full-row form (`packed=False`) the same again."""
    from actors.losses import (
        needed_positions,
        pack_responses,
        packed_token_logprobs,
        shared_prompt_logprobs,
        shared_prompt_token_logprobs,
    )
    from actors.models import load_causal_lm

    model = load_causal_lm(tiny_policy_dir, "float32", attention=attention).eval()
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(3, 250, (k,), generator=g).tolist()

    prompts = [ids(5), ids(9), ids(6), ids(3), ids(4)]
    responses = [[ids(4), ids(7), ids(1)], [ids(6)], [], [ids(2), ids(5)], [[]]]
    rows_p = [p for p, rs in zip(prompts, responses) for _ in rs]
    rows_r = [r for rs in responses for r in rs]
    for max_length in (128, 8):
        with torch.no_grad():
            ids_, attn, resp = build_sequences(rows_p, rows_r, 0, max_length)
            want = sequence_logprobs(model(input_ids=ids_, attention_mask=attn).logits, ids_, resp)
            got = shared_prompt_logprobs(model, prompts, responses, 0, max_length)
            tokens, mask = shared_prompt_token_logprobs(model, prompts, responses, 0, max_length)
            rows, row_mask = shared_prompt_token_logprobs(model, prompts, responses, 0, max_length, packed=False)
            packed = pack_responses(prompts, responses, 0, max_length, row_tokens=1)  # rows of the longest prompt
            several, _ = packed_token_logprobs(model, packed)
            all_columns, _ = packed_token_logprobs(IgnoresLogitsToKeep(model), packed)
        assert got.shape == want.shape == (7,)
        assert torch.allclose(got, want, atol=1e-4), (got, want)
        # the packing computes exactly the needed positions (its cells that are not padding) and reads exactly
        # the needed logits
        assert packed.ids.shape[0] > 1 and (int((packed.group >= 0).sum()), int(packed.source.unique().numel())) == needed_positions(
            prompts, responses, max_length)
        assert torch.equal(mask, row_mask) and mask.sum(-1).tolist() == [
            len(cut_to_fit(p, r, max_length)[1]) for p, r in zip(rows_p, rows_r)]
        for other in (rows, several, all_columns):
            assert torch.allclose(tokens, other, atol=1e-4)
        assert float((tokens * (1 - mask)).abs().max()) == 0.0  # padding carries nothing into a sum
    with torch.no_grad():
        empty, empty_mask = shared_prompt_token_logprobs(model, [ids(4)], [[[], []]], 0, 128)
        none, _ = shared_prompt_token_logprobs(model, [ids(4)], [[]], 0, 128)
    assert empty.shape == (2, 1) and float(empty_mask.sum()) == 0.0 and none.shape == (0, 1)


def test_packing_is_checked_against_full_rows(tiny_policy_dir):
    """The learner's set-up probe: the model itself passes, eager and sdpa, float32 and bfloat16. Injected
    faults fail it: a mask that lets a response see the other in either dtype (its log-probs move when the other
    response changes, an exact check); a model that never gets the mask or drops the position ids in float32
    (against full rows within 1e-3; in bfloat16 the tolerance is 0.5, which the tiny random policy's flat
    log-probs stay within, and real models' do not: 1.7-3.6 on SmolLM2-135M)."""
    from actors.losses import packing_is_exact
    from actors.models import load_causal_lm

    for attention in ("eager", "sdpa"):
        for dtype in ("float32", "bfloat16"):
            model = load_causal_lm(tiny_policy_dir, dtype, attention=attention).eval()
            assert packing_is_exact(model)
            assert not packing_is_exact(SeesTheOtherResponse(model))
            assert packing_is_exact(IgnoresLogitsToKeep(model))  # harmless: the packing reads its own columns
            if dtype == "float32":
                assert not packing_is_exact(DropsTheMask(model))
                assert not packing_is_exact(IgnoresPositions(model))


def test_a_sliding_window_shorter_than_the_rows_turns_packing_off():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from actors.losses import sliding_window_binds

    assert not sliding_window_binds(LlamaConfig(), 2048)
    assert not sliding_window_binds(Qwen2Config(sliding_window=512), 2048)  # use_sliding_window is off
    assert sliding_window_binds(MistralConfig(sliding_window=1024), 2048)
    assert not sliding_window_binds(MistralConfig(sliding_window=4096), 2048)
    assert sliding_window_binds(Gemma2Config(sliding_window=512), 2048)
