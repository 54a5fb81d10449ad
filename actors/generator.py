"""Generator actor: samples n responses per prompt with the current policy weights.

A plain class; the orchestrator wraps it with `ray.remote` when it builds the pool. The transformers
backend lives here; a vLLM backend implements the same three methods (`generate`, `load_weights`,
`weight_version`).
"""

from __future__ import annotations

import time

import torch

from actors.models import load_causal_lm, load_tokenizer, prepare_worker, render_prompt
from actors.types import PromptChunk, Response, Rollout, RolloutChunk, WeightBundle
from orchestrator.config import GeneratorConfig


class Generator:
    def __init__(self, cfg: GeneratorConfig, model_path: str, tokenizer_path: str, dtype: str,
                 max_prompt_length: int, trust_remote_code: bool = False, name: str = "generator"):
        prepare_worker(cfg.cpus_per_actor)
        self.cfg = cfg
        self.name = name
        self.max_prompt_length = max_prompt_length
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code, padding_side="left")
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        self.model.to(self.device)
        self.version = 0

    def weight_version(self) -> int:
        return self.version

    def load_weights(self, bundle: WeightBundle) -> int:
        """Copy the learner's full state dict into this engine in place; returns the new version."""
        if bundle.version < self.version:
            raise ValueError(f"{self.name}: refusing weight version {bundle.version} older than {self.version}")
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(bundle.tensors, strict=False)
        if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
            raise ValueError(f"{self.name}: weight bundle does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        self.version = bundle.version
        return self.version

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights on CPU (for checks that a sync landed exactly)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def generate(self, chunk: PromptChunk) -> RolloutChunk:
        start = time.perf_counter()
        cfg, tok = self.cfg, self.tokenizer
        prompt_texts = [render_prompt(tok, p.messages) for p in chunk.prompts]
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"][-self.max_prompt_length:] for t in prompt_texts]
        per_temp = cfg.n // len(cfg.temperatures)
        responses: list[list[Response]] = [[] for _ in chunk.prompts]
        torch.manual_seed(chunk.seed)
        for temperature in cfg.temperatures:
            requests = [i for i in range(len(chunk.prompts)) for _ in range(per_temp)]
            for b in range(0, len(requests), cfg.batch_size):
                batch = requests[b: b + cfg.batch_size]
                for i, resp in zip(batch, self._sample([prompt_ids[i] for i in batch], temperature)):
                    responses[i].append(resp)
        rollouts = [Rollout(prompt=p, prompt_text=t, prompt_ids=ids, responses=r, weight_version=self.version)
                    for p, t, ids, r in zip(chunk.prompts, prompt_texts, prompt_ids, responses)]
        new_tokens = sum(len(r.token_ids) for ro in rollouts for r in ro.responses)
        return RolloutChunk(round=chunk.round, chunk_id=chunk.chunk_id, rollouts=rollouts, weight_version=self.version,
                            actor=self.name, seconds=time.perf_counter() - start, new_tokens=new_tokens)

    def _sample(self, prompts: list[list[int]], temperature: float) -> list[Response]:
        tok, cfg = self.tokenizer, self.cfg
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), do_sample=True,
            temperature=temperature, top_p=cfg.top_p, top_k=0 if cfg.top_k == -1 else cfg.top_k,
            max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[:, width:].cpu()
        results = []
        for row in out.tolist():
            finished = tok.eos_token_id in row
            token_ids = row[: row.index(tok.eos_token_id) + 1] if finished else row
            text = tok.decode(token_ids, skip_special_tokens=True)
            results.append(Response(text=text, token_ids=token_ids, temperature=temperature, finished=finished))
        return results
