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


@dataclass(eq=False)
class WeightBundle:
    """The full policy weights as one safetensors payload: serialised once by the learner, stored once in
    Ray's object store, loaded by every generator (both backends take safetensors) and written unchanged
    as the round's `model.safetensors`.

    `payload` is bytes-like: a uint8 numpy array when the learner made it (Ray's object store hands numpy
    arrays to every reader without copying them: the driver that writes the checkpoint and each generator
    read the one stored copy), bytes when read from a checkpoint file.

    With LoRA adapters synced alone (learner.lora.sync=adapter) the payload is PEFT's `adapter_model.safetensors`
    and `adapter_config` its `adapter_config.json`: the two files a vLLM engine loads as an adapter."""

    version: int
    payload: Any = field(repr=False)
    adapter_config: bytes | None = field(default=None, repr=False)

    ADAPTER_WEIGHTS = "adapter_model.safetensors"
    ADAPTER_CONFIG = "adapter_config.json"

    @classmethod
    def of_adapter(cls, version: int, files: dict[str, bytes]) -> WeightBundle:
        """The adapters in PEFT's two files (by name) as a bundle."""
        return cls(version=version, payload=files[cls.ADAPTER_WEIGHTS], adapter_config=files[cls.ADAPTER_CONFIG])

    @property
    def holds_adapter(self) -> bool:
        return self.adapter_config is not None

    def adapter_files(self) -> dict[str, bytes]:
        """PEFT's two files, by name (an adapter bundle only)."""
        if self.adapter_config is None:
            raise ValueError(f"weight version {self.version} holds the whole model, not adapters")
        return {self.ADAPTER_WEIGHTS: bytes(memoryview(self.payload)), self.ADAPTER_CONFIG: self.adapter_config}

    @classmethod
    def from_tensors(cls, version: int, tensors: dict[str, torch.Tensor]) -> WeightBundle:
        return cls(version=version, payload=pack_safetensors(
            tensors, {"format": "pt", "odpo_weight_version": str(version)}))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights as views into the payload (read-only where the payload is: copy before writing)."""
        return safetensors_views(self.payload)

    def num_bytes(self) -> int:
        return memoryview(self.payload).nbytes + len(self.adapter_config or b"")


SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                      "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""safetensors' dtype names and torch's, for the ones odpo packs and reads itself."""


def pack_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
    """`tensors` in the safetensors format (readable by `safetensors.torch.load`, `safe_open`, transformers
    and vLLM), as a uint8 numpy array written in one copy from each tensor, wherever it lives and however
    strided: safetensors' own `save` takes 0.35 s for SmolLM2-135M's 257 MB in bf16, this 0.05 s (2-core
    AVX-512, docs/benchmarks.md). Tensors go largest element first, then by name, so that each starts at a
    multiple of its element size."""
    import json

    import numpy as np
    import torch

    names = {getattr(torch, t): s for s, t in SAFETENSORS_DTYPES.items()}
    unknown = sorted({str(v.dtype) for v in tensors.values() if v.dtype not in names})
    if unknown:
        raise ValueError(f"cannot pack tensors of dtype {', '.join(unknown)} (odpo packs {sorted(SAFETENSORS_DTYPES)})")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for k in order:
        n = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned, as safetensors pads it
    buffer = np.empty(8 + len(head) + offset, dtype=np.uint8)
    buffer[:8] = np.frombuffer(len(head).to_bytes(8, "little"), dtype=np.uint8)
    buffer[8:8 + len(head)] = np.frombuffer(head, dtype=np.uint8)
    flat = torch.from_numpy(buffer)[8 + len(head):]
    with torch.no_grad():
        for k in order:
            begin, end = header[k]["data_offsets"]
            v = tensors[k].detach()
            flat[begin:end].view(v.dtype).view(v.shape).copy_(v)
    return buffer


def safetensors_views(payload: Any) -> dict[str, torch.Tensor]:
    """A safetensors payload's tensors as views into it, no copy (`safetensors.torch.load` copies each)."""
    import json
    import warnings

    import torch

    size = memoryview(payload).nbytes
    n = int.from_bytes(bytes(memoryview(payload)[:8]), "little") if size >= 8 else -1
    if not 2 <= n <= size - 8:
        raise ValueError(f"not a safetensors payload: header of {n} bytes in {size}")
    header = json.loads(bytes(memoryview(payload)[8:8 + n]))
    with warnings.catch_warnings():  # a read-only payload (bytes, the object store's): only read from
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(payload, dtype=torch.uint8)[8 + n:] if size > 8 + n else torch.empty(0, dtype=torch.uint8)
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or not 0 <= begin <= end <= len(flat):
            raise ValueError(f"safetensors payload: tensor {k} has dtype {info['dtype']} and bytes {begin}-{end} "
                             f"of {len(flat)}")
        out[k] = flat[begin:end].view(getattr(torch, dtype)).view(info["shape"])
    return out
