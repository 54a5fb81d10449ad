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

import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from actors.settings import ADAPTER_DIR
from actors.types import Pair, WeightBundle
from orchestrator import integrity
from orchestrator.config import (
    TRAINED_REWARD_MODEL,
    InputError,
    InputNotFound,
    OdpoConfig,
    OutputExists,
    to_yaml,
)


class WriteFailed(InputError):
    """A run directory's write failed (a full disk): the run stops; the last committed round is intact."""


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM)
"""Errors of a write the user can fix (space, quota, a read-only or failing disk, permissions); any other
OSError (a timeout, a model that cannot be read) is not turned into WriteFailed."""

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
            elif os.path.exists(state_path) or self._checkpoint_rounds():
                self._resume(cfg, state_path)
                self._drop_uncommitted()
            elif os.listdir(self.path) and not os.path.exists(os.path.join(self.path, "config.yaml")):
                raise OutputExists(f"{self.path} exists and is not an odpo run directory")
            else:  # died before its first commit: nothing is done, whatever round 0 left is redone
                self._drop_uncommitted()
        with self.writing("the run directory"):
            for sub in ("pairs", "checkpoints", BASE_FILES_DIR):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            write_atomic(os.path.join(self.path, "config.yaml"), to_yaml(cfg))
        self.wandb_run = None

    def start_wandb(self, cfg: OdpoConfig) -> None:
        """The run's wandb run (resumed under its id), where metrics.wandb asks for one. The session starts it
        once the pools are building: its start (1-2 s, mostly waiting for wandb's service) then overlaps them
        instead of delaying Ray. Nothing is logged before the first commit."""
        if cfg.metrics.wandb and cfg.metrics.wandb_mode != "disabled" and self.wandb_run is None:
            import wandb

            self.wandb_run = wandb.init(project=cfg.metrics.wandb_project, name=cfg.run.name, dir=self.path,
                                        mode=cfg.metrics.wandb_mode, config=_plain(cfg), reinit="finish_previous",
                                        id=self.wandb_id, resume="allow" if self.wandb_id else None)
            self.wandb_id = self.wandb_run.id

    def _resume(self, cfg: OdpoConfig, state_path: str) -> None:
        """Continue after the last committed round whose files are intact (integrity.py). A state.json that
        is missing or does not parse is rebuilt from the files; a damaged round is set aside in damaged/
        with every round after it, and redone. Never a silent start from round 0 over good rounds."""
        state, damage = self._read_state(state_path)
        if state is not None:
            fixed, claimed, self.wandb_id = state["fixed"], state["completed_rounds"], state.get("wandb_id")
        else:  # the rounds are those with a checkpoint; the fixed keys as the last driver saved them
            fixed, claimed = self._fixed_from_config(damage), max(self._checkpoint_rounds(), default=-1) + 1
        for key in RESUME_FIXED_KEYS:
            section, name = key.split(".")
            now = getattr(getattr(cfg, section), name)
            # a key newer than the run directory: the run used that key's default (run.mode: online)
            was = fixed[key] if key in fixed else getattr(getattr(OdpoConfig(), section), name)
            if was != now:
                raise InputError(f"cannot resume {self.path}: `{key}` was {was!r} and is now "
                                 f"{now!r}; keep it, or start a new run (run.name) or overwrite (run.overwrite=true)")
        if claimed > cfg.run.rounds:
            raise InputError(f"cannot resume {self.path}: it has {claimed} rounds done, more than "
                             f"run.rounds={cfg.run.rounds}")
        intact, problem = self._intact_rounds(claimed)
        self.completed = intact
        if state is None and not os.path.exists(state_path) and intact == 0:
            return  # no state.json and no round whole: the driver died before its first commit (leftovers go)
        damage = "; ".join(p for p in (damage, problem) if p) or None
        if damage is None:
            return
        aside = self._set_aside(intact, claimed)
        where = f"; round {intact}'s files and every later round's are kept in {aside}" if aside else ""
        done = f"{claimed} round(s) were committed" if state is not None else f"{claimed} round(s) have a checkpoint"
        print(f"odpo: {damage}: resuming {self.path} after round {intact - 1}, the last round whose files are intact"
              if intact else f"odpo: {damage}: no round of {self.path} has intact files; starting it from round 0",
              f"({done}{where})", file=sys.stderr)
        with self.writing("state.json", clean=False):
            self.commit(cfg, intact)

    def _read_state(self, state_path: str) -> tuple[dict | None, str | None]:
        """state.json, or None and what is wrong with it (missing, does not parse, or lacks its fields)."""
        if not os.path.exists(state_path):
            return None, f"{state_path} is missing"
        try:
            with open(state_path) as f:
                state = json.load(f)
            if not (isinstance(state, dict) and isinstance(state.get("completed_rounds"), int)
                    and state["completed_rounds"] >= 0 and isinstance(state.get("fixed"), dict)):
                raise ValueError("no completed_rounds and fixed keys")
            return state, None
        except (ValueError, UnicodeDecodeError) as e:
            return None, f"{state_path} does not parse ({type(e).__name__}: {str(e)[:80]})"

    def _fixed_from_config(self, damage: str) -> dict:
        """The keys a resume may not change, from config.yaml (the last driver's resolved config)."""
        import yaml

        try:
            with open(self.sub("config.yaml")) as f:
                saved = yaml.safe_load(f)
            return {k: saved[k.split(".")[0]][k.split(".")[1]] for k in RESUME_FIXED_KEYS}
        except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
            raise InputError(f"cannot resume {self.path}: {damage}, and config.yaml, which would stand in for it, "
                             f"cannot be read ({type(e).__name__}: {e}); restore one of them, or start a new run "
                             "(run.name) or overwrite (run.overwrite=true)") from None

    def _checkpoint_rounds(self) -> list[int]:
        """Rounds with a checkpoint under its final name (written whole: renamed from .tmp)."""
        folder = self.sub("checkpoints")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return sorted(int(n.split("_")[1]) for n in names if n.startswith("round_") and n.split("_")[1].isdigit())

    def _intact_rounds(self, claimed: int) -> tuple[int, str | None]:
        """How many of the `claimed` rounds can be kept, and what is wrong with the first that cannot: every
        kept round's metrics line and pairs file intact, and the last kept round's checkpoint too (the one a
        resume loads; earlier checkpoints are outputs only)."""
        lines, torn = integrity.metrics_lines(self.sub("metrics.jsonl"))
        problem = None
        intact = 0
        for r in range(claimed):
            m = lines.get(r)
            if m is None:
                problem = next(iter(torn), f"{self.sub('metrics.jsonl')} has no line for round {r}")
                break
            count = m.get("pairs/count")
            if problem := integrity.jsonl_problem(self.sub("pairs", f"round_{r}.jsonl"), count):
                break
            intact = r + 1
        while intact and (broken := integrity.checkpoint_problem(self.checkpoint_dir(intact - 1))):
            problem = broken  # the nearest round before it with a whole checkpoint is the resume point
            intact -= 1
        if intact and (ahead_problem := self._ahead_problem(intact)):
            problem = problem or ahead_problem
        return intact, problem

    def _ahead_problem(self, completed: int) -> str | None:
        """A damaged draw of the next round (run.staleness=1) is not used: that round streams synchronously."""
        path = self.ahead_path(completed)
        if not os.path.exists(path) or not (problem := integrity.jsonl_problem(path)):
            return None
        os.remove(path)
        return f"{problem} (not used: round {completed} streams its pairs anew)"

    def _set_aside(self, intact: int, claimed: int) -> str | None:
        """Move what rounds `intact`..`claimed`-1 committed (checkpoints, pairs, the draws they made) and a copy of
        metrics.jsonl as it was into damaged/<UTC time>/: nothing a resume gives up is deleted."""
        moves = [self.sub(sub, f"round_{r}{ext}") for r in range(intact, claimed)
                 for sub, ext in (("checkpoints", ""), ("pairs", ".jsonl"))]
        # a round's draw ahead is the next round's pairs: the kept round's draw (round `intact`) stays
        moves += [self.ahead_path(r) for r in range(intact + 1, claimed + 1)]
        moves = [p for p in moves if os.path.exists(p)]
        if not moves and claimed <= intact:
            return None
        aside = self.sub("damaged", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        with self.writing(f"{aside} (setting damaged rounds aside)", clean=False):  # what is not moved stays
            for path in moves:
                dest = os.path.join(aside, os.path.relpath(path, self.path))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(path, dest)
            if os.path.exists(self.sub("metrics.jsonl")):
                os.makedirs(aside, exist_ok=True)
                shutil.copyfile(self.sub("metrics.jsonl"), os.path.join(aside, "metrics.jsonl"))
        return aside

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
        self.remove_uncommitted()
        if os.path.isdir(self.sub(AHEAD_DIR)):  # only the pairs of the round to run next were committed
            for name in os.listdir(self.sub(AHEAD_DIR)):
                if name != f"round_{self.completed}.jsonl":
                    os.remove(self.sub(AHEAD_DIR, name))
        rounds, _ = integrity.metrics_lines(self.sub("metrics.jsonl"))  # lines that do not parse are uncommitted
        kept = [rounds[r] for r in sorted(rounds) if r < self.completed]
        with self.writing("metrics.jsonl"):
            write_atomic(self.sub("metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in kept))

    def remove_uncommitted(self) -> None:
        """Checkpoints and pairs files of rounds at or after `self.completed` (and half-written .tmp ones)."""
        def stale(name: str) -> bool:
            return name.endswith(".tmp") or int(name.split("_")[1].split(".")[0]) >= self.completed

        for sub, remove in (("checkpoints", shutil.rmtree), ("pairs", os.remove)):
            if os.path.isdir(self.sub(sub)):
                for name in filter(stale, os.listdir(self.sub(sub))):
                    remove(self.sub(sub, name))

    @contextmanager
    def writing(self, what: str, clean: bool = True) -> Iterator[None]:
        """A write that fails (a full disk, a quota, a read-only mount) stops the run with what to do: the
        last committed round is intact, since nothing but state.json commits a round. `clean`: remove what
        the uncommitted round had written (a full disk gets its space back)."""
        try:
            yield
        except OSError as e:
            if isinstance(e, TimeoutError) or e.errno not in WRITE_ERRORS:  # not a write that failed: as it is
                raise
            try:
                if clean:
                    self.remove_uncommitted()
            except OSError:
                pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.path).free / 2**20 if os.path.isdir(self.path) else float("nan")
                fix = f"free space on the disk that holds {self.path} ({free:.0f} MiB free now)"
            else:
                fix = "fix the cause"
            done = (f"round {self.completed - 1} is the last committed round and is intact" if self.completed
                    else "no round is committed yet")
            raise WriteFailed(f"could not write {what}: {e.strerror or e} ({e.filename or self.path}); {done}: "
                              f"{fix}, then run the same command again to resume") from e

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
        try:
            saved = json.load(open(path)) if os.path.exists(path) else {}
        except ValueError as e:  # damaged: what it was made with is unknown
            if self.completed:
                raise InputError(f"cannot resume {self.path}: {path} does not parse ({e}), so the {what} it "
                                 f"describes cannot be checked; restore it, or remove {folder} and start a new run "
                                 "(run.name)") from None
            saved = {"(unreadable record)": str(path)}
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

    def read_checkpoint(self, round_index: int, version: int, adapters: bool = False) -> WeightBundle:
        """A committed checkpoint's weights as the bundle the generators load (the file's bytes as they are):
        the whole policy, or with `adapters` its LoRA adapters (learner.lora.sync=adapter)."""
        return read_checkpoint_weights(self.checkpoint_dir(round_index), version, adapters)

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

    def write_checkpoint(self, round_index: int, bundle: WeightBundle | None, optimizer_states: list[bytes] = (),
                         adapter: dict[str, bytes] | None = None) -> str:
        """The round's checkpoint: the policy's config and tokenizer, the whole policy's weights (`bundle`, the
        synced bytes as they are; None: a LoRA run that syncs only its adapters and keeps no merged copy), each
        learner rank's AdamW state (`optimizer/rank_<r>.safetensors`, learner.reset_optimizer_each_round=false),
        a LoRA run's adapters in PEFT's format (`adapter/`) and, last, checksums.json; written in
        `round_<k>.tmp` and renamed whole. A failed write leaves nothing."""
        if bundle is None and not adapter:
            raise ValueError("a checkpoint needs the policy's weights or its adapters")
        final = self.checkpoint_dir(round_index)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        files: dict[str, bytes] = {}
        for root, _, names in os.walk(self.sub(BASE_FILES_DIR)):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), self.sub(BASE_FILES_DIR))] = f.read()
        if bundle is not None:
            files["model.safetensors"] = bundle.payload  # the synced bytes, written as they are
        files |= {f"optimizer/rank_{rank}.safetensors": payload for rank, payload in enumerate(optimizer_states)}
        files |= {f"{ADAPTER_DIR}/{name}": data for name, data in (adapter or {}).items()}
        try:
            for rel, data in files.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                write_bytes(os.path.join(tmp, rel), data)
            write_bytes(os.path.join(tmp, integrity.CHECKSUMS_FILE),  # hashed from the bytes in memory, not re-read
                        json.dumps(integrity.checksums(files), indent=1).encode())
            if os.path.exists(final):  # this round's, uncommitted (written again after a failed commit)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


def read_checkpoint_weights(folder: str, version: int, adapters: bool = False) -> WeightBundle:
    """The checkpoint in `folder` as a weight bundle of version `version`: its model.safetensors, or with
    `adapters` its adapter/ (PEFT's two files). A checkpoint without what is asked says what it holds."""
    if adapters:
        paths = {name: os.path.join(folder, ADAPTER_DIR, name)
                 for name in (WeightBundle.ADAPTER_WEIGHTS, WeightBundle.ADAPTER_CONFIG)}
        if not all(os.path.isfile(p) for p in paths.values()):
            raise InputNotFound(f"{folder} holds no LoRA adapters ({ADAPTER_DIR}/{WeightBundle.ADAPTER_WEIGHTS}): "
                                f"it was saved by a run without learner.lora; load it with learner.lora.sync=merged")
        return WeightBundle.of_adapter(version, {name: open(p, "rb").read() for name, p in paths.items()})
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        if os.path.isdir(os.path.join(folder, ADAPTER_DIR)):
            raise InputNotFound(f"{folder} holds only LoRA adapters ({ADAPTER_DIR}/, no model.safetensors): load them "
                                f"with learner.lora.sync=adapter (vLLM generators)")
        raise InputNotFound(f"{folder} is not a checkpoint (no model.safetensors)")
    with open(path, "rb") as f:
        return WeightBundle(version=version, payload=f.read())


def merge_checkpoint(checkpoint: str, dest: str) -> str:
    """`odpo merge`: a LoRA run's checkpoint as a plain model at `dest` (a new folder): the initial policy the
    adapters were trained on (their `base_model_name_or_path`) with `adapter/` merged in by peft (in float32,
    saved in the dtype the checkpoint's config.json names), beside its config and tokenizer files. Loads in transformers and vLLM
    without peft; what learner.lora.save_merged writes each round, for a checkpoint saved without it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(checkpoint, ADAPTER_DIR)
    config_path = os.path.join(adapter, WeightBundle.ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise InputNotFound(f"{checkpoint} holds no LoRA adapters ({ADAPTER_DIR}/{WeightBundle.ADAPTER_CONFIG}): "
                            f"odpo merge takes a checkpoint of a run with learner.lora")
    if os.path.exists(dest) and os.listdir(dest):
        raise OutputExists(f"{dest} exists and is not empty: give odpo merge a new folder")
    with open(config_path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise InputNotFound(f"the adapters' initial policy {base!r} (adapter_config.json's base_model_name_or_path) "
                            f"is not a model folder here: odpo merge runs where the run's policy is")
    with open(os.path.join(checkpoint, "config.json")) as f:
        dtype = getattr(torch, json.load(f).get("dtype") or "float32")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = merged.merge_and_unload().to(dtype)  # merged in float32, saved as the checkpoint's weights are
    tmp = dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    skip = {"model.safetensors", "config.json", integrity.CHECKSUMS_FILE, "eval.json"}
    for name in os.listdir(checkpoint):  # the tokenizer and chat template files
        if name not in skip and os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
    if os.path.isdir(dest):
        os.rmdir(dest)
    os.replace(tmp, dest)
    return dest


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


def write_bytes(path: str, data: bytes) -> None:
    """Every file of a run directory is written here (so a test can fail it as a full disk would), to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    """`text` at `path` whole or not at all: written to `path`.tmp and renamed; a failed write leaves no .tmp."""
    tmp = path + ".tmp"
    try:
        write_bytes(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
