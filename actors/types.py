"""What crosses an actor boundary: typed dataclasses, never dicts of lists.

Every rollout and pair carries the weight version of the policy that produced it; the driver checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]


@dataclass
class Prompt:
    uid: int
    """Index of the prompt in the (shuffled) dataset: unique within a run."""
    messages: Messages
    """Chat messages ending with a user turn."""
    columns: dict[str, Any] = field(default_factory=dict)
    """The dataset row's other columns (e.g. the reference `answer`): reward functions receive the ones they name,
    as TRL passes dataset columns to its reward functions."""


@dataclass
class PromptChunk:
    round: int
    chunk_id: int
    prompts: list[Prompt]
    seed: int
    """Sampling seed for this chunk: results do not depend on which actor runs it."""


@dataclass
class Response:
    text: str
    token_ids: list[int]
    """Generated ids, ending with EOS when the model stopped by itself."""
    temperature: float
    finished: bool
    """True when EOS was produced, False when cut at max_new_tokens."""


@dataclass
class Rollout:
    prompt: Prompt
    prompt_text: str
    """The prompt after the policy's chat template (with the generation prompt)."""
    prompt_ids: list[int]
    responses: list[Response]
    weight_version: int


@dataclass
class RolloutChunk:
    round: int
    chunk_id: int
    rollouts: list[Rollout]
    weight_version: int
    actor: str
    seconds: float
    new_tokens: int


@dataclass
class RolloutMeta:
    """The small half of a generation result: the driver reads it (it raises if the actor died) and checks
    the version, while the rollouts themselves go to a scorer by reference."""

    chunk_id: int
    actor: str
    weight_version: int
    prompts: int
    new_tokens: int
    seconds: float

    @classmethod
    def of(cls, chunk: RolloutChunk) -> RolloutMeta:
        return cls(chunk.chunk_id, chunk.actor, chunk.weight_version, len(chunk.rollouts), chunk.new_tokens,
                   chunk.seconds)


@dataclass
class ScoredChunk:
    rollouts: RolloutChunk
    scores: list[list[float]]
    """scores[i][j]: reward of rollouts.rollouts[i].responses[j] (pairwise: comparisons it won)."""
    actor: str
    seconds: float
    picks: list[tuple[int, int]] | None = None
    """Pairwise: (best, worst) response index per prompt, found by the tournament."""
    comparisons: int = 0
    """Pairwise: judge comparisons made for this chunk."""
    failures: int = 0
    """Rows the reward function raised on, scored scorer.failure_score (scorer.function_errors=score)."""


@dataclass
class Pair:
    uid: int
    round: int
    weight_version: int
    prompt_messages: Messages
    prompt_text: str
    prompt_ids: list[int]
    chosen: str
    rejected: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_score: float
    rejected_score: float
    columns: dict[str, Any] = field(default_factory=dict)
    """The prompt row's other columns (e.g. its answer), so a pair can be checked again by a verifier."""
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    """The reference model's summed log-probs of the two responses, once the stream's reference stage has
    computed them (None: the training step computes them itself)."""


@dataclass
class TrainStepStats:
    loss: float
    accuracy: float
    chosen_reward: float
    rejected_reward: float
    pairs: int
    lr: float
    grad_norm: float
    seconds: float
    tokens: int = 0
    """Prompt + chosen + rejected tokens of the step's real pairs (as trained, after cutting to max_length)."""
    computed_tokens: int = 0
    """Token positions the step's forwards computed, padding included (summed over ranks)."""
    padded_tokens: int = 0
    flops: float = 0.0
    """Useful FLOPs of the step (linear layers, real tokens only; summed over ranks)."""


@dataclass
class WeightBundle:
    """The full policy weights as one safetensors payload: serialised once by the learner, stored once in
    Ray's object store, loaded by every generator (both backends take safetensors) and written unchanged
    as the round's `model.safetensors`."""

    version: int
    payload: bytes = field(repr=False)

    @classmethod
    def from_tensors(cls, version: int, tensors: dict[str, torch.Tensor]) -> WeightBundle:
        from safetensors.torch import save

        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return cls(version=version, payload=save(contiguous, metadata={"format": "pt", "odpo_weight_version": str(version)}))

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.payload)

    def num_bytes(self) -> int:
        return len(self.payload)
