"""The run directory: resolved config, metrics (JSONL + wandb), per-round pairs, HF checkpoints.

Everything a round writes appears only when complete: files go to a temporary name and are renamed.

    runs/<name>/config.yaml
    runs/<name>/metrics.jsonl              one JSON object per round
    runs/<name>/pairs/round_<k>.jsonl      prompt, chosen, rejected, scores, round, weight_version
    runs/<name>/checkpoints/round_<k>/     config.json, model.safetensors, tokenizer files
    runs/<name>/ahead/round_<k>.jsonl      run.staleness=1: the next round's pairs, drawn during round k-1 and
                                           committed with it (orchestrator/ahead.py)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

from actors.types import Pair, WeightBundle
from orchestrator.config import (
    TRAINED_REWARD_MODEL,
    InputError,
    InputNotFound,
    OdpoConfig,
    OutputExists,
    to_yaml,
)

BASE_FILES_DIR = "base"
AHEAD_DIR = "ahead"


STATE_FILE = "state.json"
# Changing these between a run and its resume would make the resumed rounds inconsistent with the done ones.
RESUME_FIXED_KEYS = ("run.seed", "policy.path", "data.path", "data.prompt_field", "data.prompts_per_round",
                     "data.shuffle", "run.mode", "offline.dataset")


class RunDir:
    """A new run directory, or an existing one to resume: `completed` rounds are done and committed.

    A round is committed by writing `state.json` last; anything of a later round (a checkpoint, a pairs
    file, a metrics line written before the driver died) is removed on resume and redone.
    """

    def __init__(self, cfg: OdpoConfig):
        self.path = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
        self.completed, self.wandb_id = 0, None
        state_path = os.path.join(self.path, STATE_FILE)
        if os.path.exists(self.path):
            if cfg.run.overwrite:
                shutil.rmtree(self.path)
            elif not cfg.run.resume:
                raise OutputExists(f"run directory {self.path} exists; set run.resume=true to continue it, "
                                      "run.overwrite=true to replace it, or choose another run.name")
            elif os.path.exists(state_path):
                self._load_state(cfg, state_path)
                self._drop_uncommitted()
            elif os.listdir(self.path) and not os.path.exists(os.path.join(self.path, "config.yaml")):
                raise OutputExists(f"{self.path} exists and is not an odpo run directory")
            else:  # died before its first commit: nothing is done, whatever round 0 left is redone
                self._drop_uncommitted()
        for sub in ("pairs", "checkpoints", BASE_FILES_DIR):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        write_atomic(os.path.join(self.path, "config.yaml"), to_yaml(cfg))
        self.wandb_run = None
        if cfg.metrics.wandb and cfg.metrics.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.metrics.wandb_project, name=cfg.run.name, dir=self.path,
                                        mode=cfg.metrics.wandb_mode, config=_plain(cfg), reinit="finish_previous",
                                        id=self.wandb_id, resume="allow" if self.wandb_id else None)
            self.wandb_id = self.wandb_run.id

    def _load_state(self, cfg: OdpoConfig, state_path: str) -> None:
        with open(state_path) as f:
            state = json.load(f)
        for key in RESUME_FIXED_KEYS:
            section, name = key.split(".")
            now = getattr(getattr(cfg, section), name)
            # a key newer than the run directory: the run used that key's default (run.mode: online)
            was = state["fixed"][key] if key in state["fixed"] else getattr(getattr(OdpoConfig(), section), name)
            if was != now:
                raise InputError(f"cannot resume {self.path}: `{key}` was {was!r} and is now "
                                 f"{now!r}; keep it, or start a new run (run.name) or overwrite (run.overwrite=true)")
        self.completed, self.wandb_id = state["completed_rounds"], state.get("wandb_id")
        if self.completed > cfg.run.rounds:
            raise InputError(f"cannot resume {self.path}: it has {self.completed} rounds done, more than "
                             f"run.rounds={cfg.run.rounds}")

    def write_job_marker(self) -> None:
        """job.json: the Ray job this driver runs as (`odpo submit` puts its id in the job's metadata), so
        `odpo scale JOB` knows a run directory it sees is that job's."""
        raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
        job_id = (json.loads(raw).get("metadata") or {}).get("odpo_job_id") if raw else None
        write_atomic(os.path.join(self.path, "job.json"), json.dumps({"job_id": job_id, "pid": os.getpid()}))

    def write_placement(self, nodes: dict[str, dict[str, str]]) -> None:
        """placement.json: pool -> actor name -> node id, as of the last round."""
        write_atomic(os.path.join(self.path, "placement.json"), json.dumps(nodes, indent=1))

    def _drop_uncommitted(self) -> None:
        """Remove what rounds at or after `self.completed` wrote before the driver died."""
        def stale(name: str) -> bool:
            return name.endswith(".tmp") or int(name.split("_")[1].split(".")[0]) >= self.completed

        for sub, remove in (("checkpoints", shutil.rmtree), ("pairs", os.remove)):
            if os.path.isdir(self.sub(sub)):
                for name in filter(stale, os.listdir(self.sub(sub))):
                    remove(self.sub(sub, name))
        if os.path.isdir(self.sub(AHEAD_DIR)):  # only the pairs of the round to run next were committed
            for name in os.listdir(self.sub(AHEAD_DIR)):
                if name != f"round_{self.completed}.jsonl":
                    os.remove(self.sub(AHEAD_DIR, name))
        kept = [m for m in self.history() if m["round"] < self.completed]
        write_atomic(self.sub("metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in kept))

    def commit(self, cfg: OdpoConfig, completed_rounds: int) -> None:
        """The round's files are all in place: record it as done (the last write of a round)."""
        state = {"completed_rounds": completed_rounds, "weight_version": completed_rounds, "wandb_id": self.wandb_id,
                 "fixed": {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in RESUME_FIXED_KEYS}}
        write_atomic(self.sub(STATE_FILE), json.dumps(state, indent=1))
        self.completed = completed_rounds

    def made_with(self, folder: str, record: str, settings: dict, what: str) -> bool:
        """Whether `folder` (something the run made for itself: its reward model, its offline pairs) was made
        with `settings`, as saved in its `record` file. Made with others, it is removed while no round has
        used it (the caller makes it again); after that the resume is refused, naming what changed."""
        if not os.path.isdir(folder):
            return False
        path = os.path.join(folder, record)
        saved = json.load(open(path)) if os.path.exists(path) else {}
        now = json.loads(json.dumps(settings))  # as it reads back from JSON (tuples become lists)
        if saved == now:
            return True
        changed = ", ".join(sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k)))
        if self.completed:
            raise InputError(f"cannot resume {self.path}: its {what} was made with other settings ({changed}); "
                             "keep them, or start a new run (run.name)")
        print(f"odpo: {folder} was made with other settings ({changed}) and no round has used it: making it again",
              file=sys.stderr)
        shutil.rmtree(folder)
        return False

    def history(self) -> list[dict]:
        path = self.sub("metrics.jsonl")
        return [json.loads(line) for line in open(path)] if os.path.exists(path) else []

    def checkpoint_dir(self, round_index: int) -> str:
        return self.sub("checkpoints", f"round_{round_index}")

    def read_checkpoint(self, round_index: int, version: int) -> WeightBundle:
        """A committed checkpoint's weights as the bundle the generators load (the file's bytes as they are)."""
        with open(os.path.join(self.checkpoint_dir(round_index), "model.safetensors"), "rb") as f:
            return WeightBundle(version=version, payload=f.read())

    def save_optimizer_states(self, round_index: int, payloads: list[bytes]) -> None:
        """Each learner rank's AdamW state beside the round's checkpoint (learner.reset_optimizer_each_round=false)."""
        folder = os.path.join(self.checkpoint_dir(round_index), "optimizer")
        os.makedirs(folder, exist_ok=True)
        for rank, payload in enumerate(payloads):
            with open(os.path.join(folder, f"rank_{rank}.safetensors"), "wb") as f:
                f.write(payload)

    def load_optimizer_states(self, round_index: int, ranks: int) -> list[bytes]:
        paths = [os.path.join(self.checkpoint_dir(round_index), "optimizer", f"rank_{r}.safetensors")
                 for r in range(ranks)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise InputNotFound(f"cannot restore AdamW state: {missing[0]} is missing (saved only with "
                                    "learner.reset_optimizer_each_round=false and the same learner.num_ranks)")
        return [open(p, "rb").read() for p in paths]

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def save_policy_files(self, policy_path: str, tokenizer) -> None:
        """Config and tokenizer of the policy, copied into every checkpoint beside its weights."""
        from transformers import AutoConfig

        AutoConfig.from_pretrained(policy_path).save_pretrained(self.sub(BASE_FILES_DIR))
        tokenizer.save_pretrained(self.sub(BASE_FILES_DIR))

    def write_checkpoint(self, round_index: int, bundle: WeightBundle) -> str:
        final = self.sub("checkpoints", f"round_{round_index}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.sub(BASE_FILES_DIR), tmp)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:  # the synced bytes, written as they are
            f.write(bundle.payload)
        os.replace(tmp, final)
        return final

    def ahead_path(self, round_index: int) -> str:
        """Where round `round_index`'s pairs wait when the round before drew them (run.staleness=1)."""
        return self.sub(AHEAD_DIR, f"round_{round_index}.jsonl")

    def write_pairs(self, round_index: int, pairs: list[Pair]) -> str:
        path = self.sub("pairs", f"round_{round_index}.jsonl")
        lines = [json.dumps({
            "prompt": p.prompt_text, "prompt_messages": p.prompt_messages, "chosen": p.chosen,
            "rejected": p.rejected, "chosen_score": _finite(p.chosen_score), "rejected_score": _finite(p.rejected_score),
            "round": p.round, "weight_version": p.weight_version, "uid": p.uid,
            **({"columns": p.columns} if p.columns else {}),  # the prompt row's answer etc., for re-checking
        }, ensure_ascii=False) for p in pairs]
        write_atomic(path, "".join(line + "\n" for line in lines))
        return path

    def log_metrics(self, metrics: dict) -> None:
        path = self.sub("metrics.jsonl")
        previous = open(path).read() if os.path.exists(path) else ""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        write_atomic(path, previous + json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if v is not None}, step=metrics["round"])

    def amend_last_metrics(self, extra: dict) -> None:
        """Add `extra` to the last committed round's metrics line (a deferred evaluation's figures), and to
        wandb at that round's step (still the current one: the next round is not logged yet)."""
        path = self.sub("metrics.jsonl")
        lines = open(path).read().splitlines(keepends=True)
        last = json.loads(lines[-1])
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in extra.items()}
        write_atomic(path, "".join(lines[:-1]) + json.dumps(last | clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if v is not None}, step=last["round"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _finite(x: float) -> float | None:
    """JSON has no NaN: a pair without scores (an offline.dataset row) writes null."""
    return x if math.isfinite(x) else None


def _plain(cfg: OdpoConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def resolve_models(cfg: OdpoConfig, run_dir: str, build: bool = True) -> tuple[str, str, str | None]:
    """Where the policy, its tokenizer and the reward model load from. A builtin model is built once into
    `run_dir/base_models/` (with `build`; without, as `odpo eval` reads a finished run, it must be there) and
    scorer.model_path=reward_training is the run's own `run_dir/reward_model/`."""
    from actors.models import PACKAGED_MODELS, is_builtin, materialize_builtin

    def place(location: str, name: str, seed: int) -> str:
        if not is_builtin(location):
            return location
        dest = os.path.join(run_dir, "base_models", name)
        if os.path.exists(os.path.join(dest, "config.json")):
            return dest
        if not build and location.split(":", 1)[1] not in PACKAGED_MODELS:  # packaged: the machine's cache
            raise InputNotFound(f"{location} was materialised in the run directory, not found at {dest}; "
                                    "give the checkpoint of an odpo run, or real model paths")
        return materialize_builtin(location, dest, seed)

    policy = place(cfg.policy.path, "policy", cfg.run.seed)
    reward = cfg.scorer.model_path if cfg.scorer.type in ("reward_model", "pairwise") else None
    if reward == TRAINED_REWARD_MODEL:  # trained once Ray is up, unless an earlier driver did
        reward = os.path.join(run_dir, "reward_model")
        if not build and not os.path.isdir(reward):
            raise InputNotFound(f"scorer.model_path=reward_training: the run's reward model is not at {reward}")
    elif reward is not None:
        reward = place(reward, "reward", cfg.run.seed + 1)
    return policy, cfg.policy.tokenizer or policy, reward


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
