"""Generator actors: sample n responses per prompt with the current policy weights.

Plain classes; the orchestrator wraps the chosen backend with `ray.remote` when it builds the pool.
Both backends have the same methods: `generate(PromptChunk) -> RolloutChunk`,
`load_weights(WeightBundle) -> int`, `weight_version() -> int`.

- `VLLMGenerator` (actors/vllm_generator.py): a vLLM engine, the default wherever vLLM is installed.
- `HFGenerator` (here): transformers `generate`, the fallback.

Prompts are rendered here for both backends with the policy tokenizer's chat template (so both see
the same token ids), and responses are decoded here with the same tokenizer.
"""

from __future__ import annotations

import time

import torch

from actors.models import load_causal_lm, load_tokenizer, render_prompt, tied_copies
from actors.settings import GeneratorConfig
from actors.turns import TakesTurns, in_turn
from actors.types import PromptChunk, Response, Rollout, RolloutChunk, RolloutMeta, WeightBundle
from actors.worker import own_process_ids, prepare_worker


class PromptRenderer:
    """Chat template + tokenisation + left truncation of prompts, and decoding of responses."""

    def __init__(self, tokenizer, max_prompt_length: int, stop_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.stop_ids = [tokenizer.eos_token_id, *stop_token_ids]

    def render(self, chunk: PromptChunk) -> tuple[list[str], list[list[int]]]:
        texts = [render_prompt(self.tokenizer, p.messages) for p in chunk.prompts]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_prompt_length:] for t in texts]
        return texts, ids

    def response(self, token_ids: list[int], temperature: float) -> Response:
        """Cut at the first stop token (kept: the learner trains the model to stop) and decode."""
        stops = [i for i, t in enumerate(token_ids) if t in self.stop_ids]
        finished = bool(stops)
        if finished:
            token_ids = token_ids[: stops[0] + 1]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Response(text=text, token_ids=list(token_ids), temperature=temperature, finished=finished)


def build_chunk(chunk: PromptChunk, texts: list[str], ids: list[list[int]], responses: list[list[Response]],
                version: int, actor: str, start: float) -> RolloutChunk:
    rollouts = [Rollout(prompt=p, prompt_text=t, prompt_ids=i, responses=r, weight_version=version)
                for p, t, i, r in zip(chunk.prompts, texts, ids, responses)]
    new_tokens = sum(len(r.token_ids) for ro in rollouts for r in ro.responses)
    return RolloutChunk(round=chunk.round, chunk_id=chunk.chunk_id, rollouts=rollouts, weight_version=version,
                        actor=actor, seconds=time.perf_counter() - start, new_tokens=new_tokens)


class GeneratorBase(TakesTurns):
    """What the pool and the driver call on every backend besides `generate` and `load_weights`."""

    def __init__(self, cfg: GeneratorConfig, tokenizer_path: str, max_prompt_length: int, trust_remote_code: bool,
                 name: str, padding_side: str = "right"):
        prepare_worker(cfg.cpus_per_actor)
        self.cfg, self.name, self.version = cfg, name, 0
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code, padding_side=padding_side)
        self.renderer = PromptRenderer(self.tokenizer, max_prompt_length, cfg.stop_token_ids)

    def _check_newer(self, version: int) -> None:
        if version < self.version:
            raise ValueError(f"{self.name}: refusing weight version {version} older than {self.version}")

    def ready(self) -> str:
        return self.name

    def weight_version(self) -> int:
        return self.version

    def generate_with_meta(self, chunk: PromptChunk) -> tuple[RolloutMeta, RolloutChunk]:
        """Called with num_returns=2 by the driver: it reads the meta, the scorer gets the rollouts."""
        out = self.generate(chunk)  # type: ignore[attr-defined]
        return RolloutMeta.of(out), out

    def process_ids(self) -> list[int]:
        return own_process_ids()


class HFGenerator(GeneratorBase):
    def __init__(self, cfg: GeneratorConfig, model_path: str, tokenizer_path: str, dtype: str,
                 max_prompt_length: int, trust_remote_code: bool = False, name: str = "generator",
                 max_lora_rank: int = 0):
        if max_lora_rank:
            raise ValueError("the transformers generator takes merged weights, not adapters (learner.lora.sync=merged)")
        super().__init__(cfg, tokenizer_path, max_prompt_length, trust_remote_code, name, padding_side="left")
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        self.model.to(self.device)
        self.tied_keys = set(tied_copies(self.model))
        """Weights stored once with another (a tied output head), which a payload may leave out."""

    @in_turn
    def load_weights(self, bundle: WeightBundle) -> int:
        """Copy the learner's full state dict into this engine in place; returns the new version."""
        self._check_newer(bundle.version)
        if bundle.holds_adapter:
            raise ValueError(f"{self.name}: weight version {bundle.version} holds LoRA adapters; the transformers "
                             "generator takes merged weights (learner.lora.sync=merged)")
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(bundle.tensors(), strict=False)
        if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq") and k not in self.tied_keys]:
            raise ValueError(f"{self.name}: weight bundle does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        self.version = bundle.version
        return self.version

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights on CPU (for checks that a sync landed exactly)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @in_turn
    @torch.no_grad()
    def generate(self, chunk: PromptChunk) -> RolloutChunk:
        start = time.perf_counter()
        texts, ids = self.renderer.render(chunk)
        per_temp = self.cfg.n // len(self.cfg.temperatures)
        responses: list[list[Response]] = [[] for _ in chunk.prompts]
        torch.manual_seed(chunk.seed)
        for temperature in self.cfg.temperatures:
            requests = [i for i in range(len(chunk.prompts)) for _ in range(per_temp)]
            for b in range(0, len(requests), self.cfg.batch_size):
                batch = requests[b: b + self.cfg.batch_size]
                for i, resp in zip(batch, self._sample([ids[i] for i in batch], temperature)):
                    responses[i].append(resp)
        return build_chunk(chunk, texts, ids, responses, self.version, self.name, start)

    def _sample(self, prompts: list[list[int]], temperature: float) -> list[Response]:
        tok, cfg = self.tokenizer, self.cfg
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=cfg.top_p,
                        top_k=0 if cfg.top_k == -1 else cfg.top_k) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.renderer.stop_ids, pad_token_id=tok.pad_token_id, **sampling,
        )[:, width:].cpu()
        return [self.renderer.response(row, temperature) for row in out.tolist()]

