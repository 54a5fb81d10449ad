"""The run directory: resolved config, metrics (JSONL + wandb), per-round pairs, HF checkpoints.

Everything a round writes appears only when complete: files go to a temporary name and are renamed.

    runs/<name>/config.yaml
    runs/<name>/metrics.jsonl              one JSON object per round
    runs/<name>/pairs/round_<k>.jsonl      prompt, chosen, rejected, scores, round, weight_version
    runs/<name>/checkpoints/round_<k>/     config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

import json
import math
import os
import shutil

from actors.types import Pair, WeightBundle
from orchestrator.config import OdpoConfig, to_yaml

BASE_FILES_DIR = "base"


class RunDir:
    def __init__(self, cfg: OdpoConfig):
        self.path = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
        if os.path.exists(self.path):
            if not cfg.run.overwrite:
                raise FileExistsError(f"run directory {self.path} exists; choose another run.name or set run.overwrite=true")
            shutil.rmtree(self.path)
        for sub in ("pairs", "checkpoints", BASE_FILES_DIR):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        _write_atomic(os.path.join(self.path, "config.yaml"), to_yaml(cfg))
        self.wandb_run = None
        if cfg.metrics.wandb and cfg.metrics.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.metrics.wandb_project, name=cfg.run.name, dir=self.path,
                                        mode=cfg.metrics.wandb_mode, config=_plain(cfg), reinit="finish_previous")

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

    def write_pairs(self, round_index: int, pairs: list[Pair]) -> str:
        path = self.sub("pairs", f"round_{round_index}.jsonl")
        lines = [json.dumps({
            "prompt": p.prompt_text, "prompt_messages": p.prompt_messages, "chosen": p.chosen,
            "rejected": p.rejected, "chosen_score": p.chosen_score, "rejected_score": p.rejected_score,
            "round": p.round, "weight_version": p.weight_version, "uid": p.uid,
        }, ensure_ascii=False) for p in pairs]
        _write_atomic(path, "".join(line + "\n" for line in lines))
        return path

    def log_metrics(self, metrics: dict) -> None:
        path = self.sub("metrics.jsonl")
        previous = open(path).read() if os.path.exists(path) else ""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        _write_atomic(path, previous + json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if v is not None}, step=metrics["round"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(cfg: OdpoConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
