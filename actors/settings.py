"""What each actor is given: its own section of the run's configuration, as plain typed dataclasses.

The driver side (`orchestrator/config.py`) composes these sections into the whole config, loads and validates
it; the actors import only this module, so the worker package never depends on the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN_PREFIX = "builtin:"
DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_DIR = "adapter"
"""A LoRA run's checkpoint keeps its adapters in PEFT's format in this folder, beside the merged weights."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The adapter ranks a vLLM engine can be built for (its `max_lora_rank`); an adapter of a rank between two is
applied by an engine built for the larger."""


def vllm_lora_rank(rank: int) -> int | None:
    """The `max_lora_rank` of a vLLM engine that applies adapters of rank `rank`: the smallest it offers at or
    above it; None above the largest."""
    return min((k for k in VLLM_LORA_RANKS if k >= rank), default=None)


def vllm_available() -> bool:
    """Without importing it (seconds, and it can fail for reasons the generator reports itself)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class RolloutPoolConfig:
    """What the generator and scorer sections share: the pool's size, each actor's placement, and its faults."""

    num_actors: int = 1
    """Actors in the pool; scale rollout here (or with `odpo scale` between rounds) without touching the learner."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (also its torch thread count, rounded up)."""
    gpus_per_actor: float = 0.0
    """GPUs reserved per actor."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources reserved per actor besides CPUs and GPUs, e.g. {rollout: 1}: the pool goes only
    to nodes started with them (`ray start --resources`)."""
    node_labels: dict[str, str] = field(default_factory=dict)
    """Node labels each actor's node must have, e.g. {odpo-role: rollout} (`ray start --labels`); Ray's
    label selector syntax (`!value`, `in(a,b)`) works too."""
    max_inflight_per_actor: int = 2
    """Chunks queued at one actor at once (backpressure; 2 keeps it busy while results travel)."""
    max_restarts: int = 3
    """Actors that may die or hang per run before the run stops; each is replaced (a generator loads the
    current weights first) and the chunks it held are dispatched again."""
    call_timeout_s: float = 1800.0
    """Seconds an actor may hold work without finishing a chunk before it counts as hung (then replaced)."""


@dataclass
class GeneratorConfig(RolloutPoolConfig):
    backend: str = "auto"
    """Generation engine: `vllm`, `hf` (transformers generate), or `auto` (vllm where it is installed, else hf)."""
    n: int = 4
    """Responses sampled per prompt (the paper: 8). At least 2, to form a pair."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Sampling temperatures; the n samples are split evenly among them (the paper: [1.0, 0.7])."""
    resample_ties: int = 0
    """A prompt whose n samples all tie (the same score: all right or all wrong) is sampled n more times, up to
    this many times, and paired over all its samples, before it counts as a drop (rejection-sampling recipes
    sample until a prompt gives a pair). 0: off. A reward scorer only (a pairwise judge finds no ties). The
    reward model's `builtin:policy-samples` data is drawn the same way (`data/*` in reward_model_metrics.jsonl)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    max_new_tokens: int = 64
    """Most tokens generated per response."""
    batch_size: int = 64
    """Sequences per `generate` call inside an actor (a chunk is split into batches of this size)."""
    chunk_size: int = 8
    """Prompts per work item sent to a generator; scoring starts as soon as the first chunk is done."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response besides the tokenizer's EOS (e.g. Llama-3's <|eot_id|>)."""
    max_model_len: int | None = None
    """vLLM: longest sequence the engine holds (null: data.max_prompt_length + max_new_tokens)."""
    gpu_memory_utilization: float = 0.9
    """vLLM on GPUs: fraction of the GPU's memory the engine may take (weights + KV cache)."""
    cpu_kvcache_gib: int = 1
    """vLLM on CPUs: GiB of KV cache per engine (VLLM_CPU_KVCACHE_SPACE); unset, vLLM takes most of a NUMA node."""
    tensor_parallel_size: int = 1
    """vLLM on GPUs: GPUs per engine (set gpus_per_actor to the same number)."""
    enforce_eager: bool | None = None
    """vLLM: skip CUDA graphs / compilation (null: true on CPU, false on GPU)."""
    weight_sync: str = "object_store"
    """How weights reach the generators: `object_store` (portable: one payload in Ray's object store, reloaded
    in place) or `nccl` (vLLM on GPUs: broadcast from learner rank 0 over NCCL, no host round trip)."""


@dataclass
class ScorerConfig(RolloutPoolConfig):
    type: str = "function"
    """`function` (a Python reward function), `reward_model` (a Bradley-Terry sequence classifier), or
    `pairwise` (a preference judge of two responses; the best and worst of n are found by a knockout
    tournament in n + ceil(n/2) - 2 comparisons instead of n(n-1)/2; needs pairs.strategy=max_min)."""
    function: str | None = None
    """Reward function as `module:function`, called as fn(messages, response) -> float; with type `pairwise`,
    a judge called as fn(messages, response_a, response_b) -> probability that a is better."""
    model_path: str | None = None
    """Reward model: a local directory, a hub id, `builtin:tiny-llama-rm` (random, for tests), or
    `reward_training`: trained first by the run itself from the `reward_training` section (as `odpo train-rm`),
    into `<run dir>/reward_model/`, once (a resumed run reuses it)."""
    tokenizer: str | None = None
    """Reward model tokenizer if not the model's own."""
    dtype: str = "float32"
    """Reward model dtype."""
    max_length: int = 4096
    """Tokens of prompt + response fed to the reward model; longer inputs keep their last tokens."""
    batch_size: int = 32
    """Sequences per reward-model forward pass."""
    trust_remote_code: bool = False
    """Allow custom model code shipped with the reward model."""
    call_timeout_s: float = 600.0
    """Seconds a scorer may hold work without finishing a chunk before it counts as hung (then replaced;
    scoring is quicker than generation, so the default is shorter)."""
    output_field: str = "logits"
    """Field of the reward model's output that holds its score: `logits` (Hugging Face sequence classifiers,
    e.g. sfairXC/FsfairX-LLaMA3-RM-v0.1) or a custom model's own (ArmoRM-Llama3-8B-v0.1: `score`, with
    trust_remote_code); a 2-D field gives its one column."""
    pairwise_generation_prompt: bool = True
    """Pairwise, a causal-LM preference model (RLHFlow's format): render its user turn with the chat template's
    generation prompt, so the next token is the assistant's answer A or B (false: without, as RLHFlow's
    annotation script renders it)."""
    pairwise_both_orders: bool = True
    """Pairwise: judge every comparison as (a, b) and (b, a) and average, so a judge's preference for the
    first (or second) position cancels out (two judge calls per comparison)."""
    function_errors: str = "stop"
    """A reward function (scorer.function, eval.gold_reward, reward_training.rule) that raises on a row: `stop`
    the run with one line naming the function, the prompt and the error; or `score` the row as a failure
    (failure_score) and count it (`score/function_errors` in the round's line, `eval/gold_errors`). A pairwise
    function judge that raises on a comparison: `stop` likewise, or `score` counts it as a tie (0.5)."""
    failure_score: float = 0.0
    """The score a row gets when the reward function raised on it (function_errors=score)."""


@dataclass
class LoraSettings:
    """LoRA adapters (peft) in place of training the whole policy (TRL's `peft_config`, OpenRLHF's `--lora_rank`)."""

    rank: int = 0
    """The adapters' rank r; 0: no adapters, every weight of the policy trains."""
    alpha: float = 16.0
    """LoRA's alpha: each adapter's update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    init_seed: int = 0
    """Seed of the adapters' random initialisation (their A matrices; B starts at zero, so the first step's
    policy is the reference whatever the seed)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Names of the linear layers that get adapters (the last part of each module's name, e.g. [q_proj, v_proj]);
    [all-linear]: every linear layer but the output head. A name the model lacks stops the run, its linear layers
    listed."""
    sync: str = "auto"
    """How each round's policy reaches the generators. `adapter`: only the adapters (megabytes, against the whole
    model's weights), applied by vLLM's LoRA support under a new adapter id each version (generator.backend=vllm);
    `merged`: the whole policy with the adapters merged into its weights (any backend, NCCL included); `auto`:
    adapter on GPU generators, merged on CPU ones (vLLM's CPU LoRA kernels generate several times slower than
    merged weights: docs/benchmarks.md)."""
    save_merged: bool = False
    """With adapters synced (sync: adapter), also write each checkpoint's merged model (model.safetensors, the
    whole policy: loads in transformers and vLLM without peft). Merged syncs always write it (the synced bytes)."""


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    """DeepSpeed data-parallel ranks, each a Ray actor; together one torch.distributed group."""
    cpus_per_rank: float = 1.0
    """CPUs reserved per learner rank."""
    gpus_per_rank: float = 0.0
    """GPUs reserved per learner rank (1 on GPU clusters)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources reserved per learner rank besides CPUs and GPUs, e.g. {trainer: 1}: the learner
    group goes only to nodes started with them (`ray start --resources`)."""
    node_labels: dict[str, str] = field(default_factory=dict)
    """Node labels each learner rank's node must have, e.g. {odpo-role: train} (`ray start --labels`); Ray's
    label selector syntax (`!value`, `in(a,b)`) works too."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (the recipe: 2)."""
    global_batch_size: int = 16
    """Preference pairs per optimizer step across all ranks (the recipe: 128)."""
    micro_batch_size: int = 4
    """Pairs per rank per forward/backward; gradient accumulation makes up the global batch."""
    lr: float = 5e-7
    """Peak learning rate (the recipe: 5e-7)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Fraction of a round's optimizer steps spent warming up linearly before the cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine decay floor as a fraction of `lr`."""
    epochs: int = 2
    """Passes over each round's pairs (the recipe: 2). The first pass streams; later ones replay."""
    reset_optimizer_each_round: bool = True
    """Fresh AdamW state each round, as the recipe's one-process-per-round training does (false keeps the
    moments, saved with each checkpoint for resume). The warmup + cosine schedule restarts every round."""
    loss: str = "sigmoid"
    """DPO loss: `sigmoid` (DPO, on log-probs summed over each response; equals Hugging Face TRL's) or `ipo`
    (IPO, on log-probs averaged over each response's tokens, as its authors and TRL define it)."""
    beta: float = 0.1
    """DPO beta (the paper's eta)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped (sigmoid loss only). The
    formula is cDPO's, -(1-eps) log sigma(beta h) - eps log sigma(-beta h), as in TRL 0.19; TRL 1.x no longer
    smooths its sigmoid loss, so with eps > 0 the two differ."""
    reference: str = "fixed"
    """Reference model: `fixed` (the initial policy, the paper) or `previous` (last round's policy)."""
    reference_ahead: bool = True
    """Compute each pair's reference log-probs once, as the round's pairs form (the learner ranks do it while
    they wait for a full batch), instead of in every training step and epoch. Same losses either way."""
    max_length: int = 2048
    """Tokens of prompt + response per training sequence; responses are cut to fit."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (the recipe: on)."""
    attention: str = "auto"
    """Attention kernel of the learner's policy and reference: `eager` (plain matrix products), `sdpa` (torch's
    fused scaled-dot-product attention) or `auto`: eager on CPUs, where odpo's short sequences (a few hundred
    tokens) train ~7% faster with it, sdpa on GPUs. Eager keeps each layer's attention matrix for the backward
    pass: for sequences of thousands of tokens on a CPU, choose sdpa."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Train LoRA adapters on the frozen policy instead of all its weights (`lora.rank` > 0). The reference is
    then the same model with its adapters switched off: no second copy in memory. The weights synced to the
    generators and saved each round are the policy with its adapters merged in."""
    keep_freed_memory: bool = True
    """Each rank's process keeps the memory torch frees for its next tensors (glibc's malloc otherwise unmaps
    every large block it frees, and the next step faults it in afresh: 1.1 GB a step on the real model, whose
    steps take 0.91 of the time with this on, on a 2-core AVX-512 CPU). Its resident memory then stays near its peak between steps (the
    real model's rank: 4.0 GB rather than falling to 3.4). Off: memory goes back to the system when freed.
    Linux with glibc only; elsewhere nothing changes."""
    dist_timeout_s: float = 1800.0
    """Timeout of collective operations between learner ranks."""
    step_timeout_s: float = 3600.0
    """Seconds one optimizer step (or the set-up, or the weight export) may take before the group counts as hung."""
    max_round_retries: int = 1
    """Times a round is retried from the last completed round's checkpoint after the learner group dies or
    hangs, before the run stops."""
