"""Learner rank: a DeepSpeed engine holding the policy, plus a frozen reference model, training DPO.

One instance per rank; the ranks of a group form one torch.distributed group (gloo on CPU, NCCL on
GPUs). Every rank is called with its slice of each global batch and runs exactly the same number of
micro-steps (ZeRO's collectives run in lockstep): as many as the largest slice of *this* batch needs, so a
partial last batch costs what its real pairs cost. A slice is sorted by length and cut into micro-batches of
near-equal size, so rows of similar length share a micro-batch and little is computed on padding; a rank
left with no pair for a micro-step computes one zero-weight pair.

Reference log-probs come with the pairs when the driver had them computed as the pairs formed
(`reference_logprobs`, the stream's reference stage); otherwise a step computes them itself.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import socket
import time
from datetime import timedelta

import torch

from actors.losses import (
    Packed,
    bradley_terry_loss,
    build_sequences,
    cosine_lr,
    cut_to_fit,
    dpo_loss,
    last_token_logits,
    needed_positions,
    pack_responses,
    packing_is_exact,
    shared_prompt_logprobs,
    shared_prompt_token_logprobs,
    sliding_window_binds,
)
from actors.models import DTYPES, add_lora_adapters, load_causal_lm, merged_state_dict, tied_copies
from actors.settings import ADAPTER_DIR, LearnerConfig
from actors.turns import TakesTurns, in_turn
from actors.types import Pair, WeightBundle
from actors.worker import keep_freed_memory, own_process_ids, prepare_worker

RARE_LOGPROB = math.log(1e-4)
"""A response token the reference gives less probability than this is "rare" (made-up words, odd symbols)."""


class Learner(TakesTurns):
    def __init__(self, cfg: LearnerConfig, policy_path: str, dtype: str, rank: int, world_size: int,
                 pad_id: int, trust_remote_code: bool = False, reference_path: str | None = None):
        prepare_worker(cfg.cpus_per_rank)
        if cfg.keep_freed_memory:
            keep_freed_memory()
        self.cfg = cfg
        self.policy_path = policy_path
        self.reference_path = reference_path or policy_path
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.trust_remote_code = trust_remote_code
        self.gas = cfg.global_batch_size // (world_size * cfg.micro_batch_size)
        self.engine = None
        self.frozen = None
        """The policy as last exported with freeze=True (rank 0; the deferred evaluation's KL)."""
        self.step_in_round = 0
        self.total_steps = 1
        self.use_cuda = torch.cuda.is_available() and cfg.gpus_per_rank > 0
        self.attention = cfg.attention if cfg.attention != "auto" else "sdpa" if self.use_cuda else "eager"
        self.lora = cfg.lora.rank > 0
        if self.lora and cfg.reference == "previous":
            raise ValueError("learner.lora: the reference is the policy with its adapters off, which a `previous` "
                             "reference cannot be; use learner.reference=fixed")
        self.reference_off_adapters = self.lora and cfg.zero_stage < 3
        """The reference is the policy with its adapters off (no second model). Under ZeRO-3 the policy's forwards
        are collective, and the reference stage asks one rank alone: there it stays a separate copy on every
        rank, as without adapters."""
        self.packing = True
        """Responses packed after their prompt under a 4D mask (`pack_responses`); False where the model's
        attention does not honour one (`packing_is_exact`, asked of the reference at set-up)."""

    # -- set-up ---------------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """Address and a free port for the group's torch.distributed store (asked of rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build the reference model and the DeepSpeed engine. Returns #params."""
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=self.cfg.dist_timeout_s), rank=self.rank,
                                   world_size=self.world_size, verbose=False)
        device = torch.device("cuda", 0) if self.use_cuda else torch.device("cpu")
        self._build_reference(device)  # before HfDeepSpeedConfig exists, so never ZeRO-3-partitioned

        ds_config = self.deepspeed_config()
        if self.cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built
        model = self._load_trained_model()
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        # fused: one pass over each parameter's state instead of one per operation (2x faster steps on CPU);
        # DeepSpeed's own Adam would need a compiled extension
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.cfg.lr, betas=tuple(self.cfg.adam_betas),
                                      weight_decay=self.cfg.weight_decay, fused=True)
        import_muon_without_compiling()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.device = self.engine.device
        if self.reference_off_adapters:  # the reference is this model with its adapters off: probed now it exists
            with self._reference() as reference:
                self._decide_packing(reference)
        e = self.engine  # plain fp32 without ZeRO: DeepSpeed's clip does not record the gradient norm
        self._norm_untracked = not (e.zero_optimization() or e.bfloat16_enabled() or e.fp16_enabled())
        self.body_flops, self.head_flops = forward_flops_per_token(self.engine.module)
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())

    def _build_reference(self, device: torch.device) -> None:
        if self.reference_off_adapters:  # the policy with its adapters off (`_reference`)
            self.reference = None
            return
        self.reference = load_causal_lm(self.reference_path, self.dtype, self.trust_remote_code,
                                        self.attention).to(device).eval()
        self.reference.requires_grad_(False)
        self._decide_packing(self.reference)

    @contextlib.contextmanager
    def _reference(self):
        """The reference model: its own frozen copy, or with LoRA the policy itself with its adapters switched off
        (in eval mode) for as long as the context lasts."""
        if not self.reference_off_adapters:
            yield self.reference
            return
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with module.disable_adapter():
                yield module
        finally:
            module.train(was_training)

    def _decide_packing(self, reference) -> None:
        windowed = sliding_window_binds(reference.config, self.cfg.max_length)
        self.packing = not windowed and packing_is_exact(reference)
        if not self.packing and self.rank == 0:
            why = (f"its attention window is shorter than learner.max_length={self.cfg.max_length}" if windowed else
                   "its attention does not compute packed rows as meant (a probe's packed log-probs differ from full "
                   "rows, or one response's depend on the other's)")
            print(f"odpo: {self.reference_path}: {why}; the learner computes each response in a full row with its own "
                  f"copy of the prompt (slower, the same log-probs)", flush=True)

    def _load_trained_model(self):
        if not self.lora:
            return load_causal_lm(self.policy_path, "float32", self.trust_remote_code, self.attention)
        # the base is the reference (the initial policy); a checkpoint of a LoRA run holds its adapters beside
        # the merged weights, and those train on
        base = load_causal_lm(self.reference_path, "float32", self.trust_remote_code, self.attention)
        if self.policy_path == self.reference_path:
            return add_lora_adapters(base, self.cfg.lora)
        adapter = os.path.join(self.policy_path, ADAPTER_DIR)
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(f"learner.lora: {self.policy_path} holds no adapters ({ADAPTER_DIR}/): it was not saved "
                             f"by a run with learner.lora; resume it without adapters, or start a new run")
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter, is_trainable=True)

    def deepspeed_config(self) -> dict:
        c = self.cfg
        return {
            "train_batch_size": c.global_batch_size,
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": self.gas,
            "gradient_clipping": c.gradient_clipping,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "fp16": {"enabled": self.dtype == "float16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    # -- a round ----------------------------------------------------------------------------------

    @in_turn
    def start_round(self, round_index: int, total_steps: int) -> None:
        """Schedule this round's `total_steps` optimizer steps; fresh optimizer state if configured."""
        self.step_in_round = 0
        self.total_steps = max(1, total_steps)
        if self.cfg.reset_optimizer_each_round:
            _innermost_optimizer(self.optimizer).state.clear()
        if self.cfg.reference == "previous" and round_index > 0:
            self.reference.load_state_dict(self._full_state_dict(to_cpu=False))

    @in_turn
    def matmul_flops(self) -> float:
        """FLOP/s of a square matmul in the policy's dtype on this rank's threads (or GPU): the machine's rate,
        against which `profile/learner_vs_peak` holds the learner's useful FLOP/s. Asked once the other pools
        are idle (a busy neighbour on the same cores lowers it)."""
        return matmul_flops(self.device, DTYPES[self.dtype])

    def ready(self) -> str:
        return f"learner-{self.rank}"

    def process_ids(self) -> list[int]:
        return own_process_ids()

    @in_turn
    def optimizer_state(self) -> bytes:
        """This rank's AdamW state (its ZeRO partition) as safetensors, for resuming with
        reset_optimizer_each_round=false. Never pickled."""
        from safetensors.torch import save

        opt = _innermost_optimizer(self.optimizer)
        tensors = {}
        for g, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                for key, value in opt.state.get(p, {}).items():
                    tensors[f"{g}.{j}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return save(tensors)

    @in_turn
    def load_optimizer_state(self, payload: bytes) -> int:
        from safetensors.torch import load

        opt = _innermost_optimizer(self.optimizer)
        params = {f"{g}.{j}": p for g, group in enumerate(opt.param_groups) for j, p in enumerate(group["params"])}
        loaded = load(payload)
        for name, value in loaded.items():
            g, j, key = name.split(".", 2)
            p = params[f"{g}.{j}"]
            opt.state.setdefault(p, {})[key] = value.to(p.device) if value.dim() else value
        return len(loaded)

    @in_turn
    def train_step(self, pairs: list[Pair], pad: Pair, batch_pairs: int) -> dict:
        """One optimizer step over this rank's `pairs` of a global batch of `batch_pairs` pairs.

        Returns sums (loss, correct, rewards, count) so the driver can combine ranks exactly, and what the
        step computed (tokens, padding, FLOPs) for the round's profile.
        """
        start = time.perf_counter()
        m = self.cfg.micro_batch_size
        if len(pairs) > self.gas * m:
            raise ValueError(f"rank {self.rank} got {len(pairs)} pairs, more than {self.gas} x {m} micro-batches hold")
        micro_batches = length_grouped(pairs, pad, micro_steps(batch_pairs, self.world_size, m))
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        lr = cosine_lr(self.step_in_round, self.total_steps, warmup, self.cfg.lr, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # engine.backward divides by gas, the gradient all-reduce averages over ranks: scale back so the
        # step's gradient is the mean over the batch's real pairs.
        scale = self.world_size * self.gas / batch_pairs
        sums = dict(loss=0.0, correct=0.0, chosen_reward=0.0, rejected_reward=0.0, pairs=len(pairs),
                    computed_tokens=0, padded_tokens=0, flops=0.0)
        for k, (micro, weights) in enumerate(micro_batches):
            # the boundary is this batch's last micro-step, whatever gas the config's full batch needs
            self.engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)
            w = torch.tensor(weights, device=self.device)
            losses, chosen_r, rejected_r, work = self._pair_losses(micro)
            if not torch.isfinite(losses).all():
                bad = sorted({p.uid for p, x in zip(micro, losses.tolist()) if not math.isfinite(x)})
                raise FloatingPointError(f"non-finite DPO loss for prompt uid(s) {bad} at optimizer step "
                                         f"{self.step_in_round} of the round; stopping before the update")
            self.engine.backward((losses * w).sum() * scale)
            if k == len(micro_batches) - 1 and self._norm_untracked:  # DeepSpeed clips but keeps no norm here
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                plain_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            self.engine.step()
            chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()  # a reward model's scores carry grad
            sums["loss"] += float((losses.detach() * w).sum())
            sums["correct"] += float(((chosen_r > rejected_r).float() * w).sum())
            sums["chosen_reward"] += float((chosen_r * w).sum())
            sums["rejected_reward"] += float((rejected_r * w).sum())
            for key in ("computed_tokens", "padded_tokens", "flops"):
                sums[key] += work[key]
        self.step_in_round += 1
        norm = plain_norm if self._norm_untracked else self.engine.get_global_grad_norm()
        cap = self.cfg.max_length
        tokens = sum(min(len(p.prompt_ids) + len(r), cap) for p in pairs for r in (p.chosen_ids, p.rejected_ids))
        sums.update(lr=lr, grad_norm=float(norm) if norm is not None else float("nan"),
                    seconds=time.perf_counter() - start, tokens=tokens)
        return sums

    @in_turn
    @torch.no_grad()
    def reference_logprobs(self, pairs: list[Pair]) -> dict:
        """The reference model's summed log-probs of each pair's chosen and rejected response (`logps`, in the
        pairs' order), computed once per pair as the pairs form (the stream's reference stage) so that no
        training step or epoch redoes them; with the `seconds` and `flops` it took. Only this rank's
        reference model is used: no collective, any rank may be asked."""
        start = time.perf_counter()
        found: dict[int, tuple[float, float]] = {}  # by the pair's identity: length_grouped reorders them
        m = self.cfg.micro_batch_size
        flops = 0.0
        for group, _ in length_grouped(pairs, None, math.ceil(len(pairs) / m)):
            with self._reference() as reference:
                logps, _, _, group_real, predicted = self._pair_logprobs(reference, group, self._pair_layout(group))
            ref = logps.tolist()
            found.update((id(p), (c, r)) for p, c, r in zip(group, ref[: len(group)], ref[len(group):]))
            flops += self.forward_flops(group_real, predicted)
        result = [found[id(p)] for p in pairs]
        return {"logps": result, "seconds": time.perf_counter() - start, "flops": flops}

    @in_turn
    @torch.no_grad()
    def log_ratios(self, prompts: list[list[int]], responses: list[list[int]], policy: bool = True,
                   frozen: bool = False) -> dict:
        """log pi(y|x) - log pi_ref(y|x) per (prompt, response) (`ratios`): its mean estimates KL(pi || pi_ref)
        on samples of pi; -log pi_ref(y|x) per response token (`ref_nll`) and the share of response tokens the
        reference gives less than 1e-4 (`ref_rare`: tokens it would almost never write, the evaluation's fluency
        figure); and the `seconds` it took. `policy=False` computes only the
        reference's figures, `ref_nll` and `ref_rare` (the initial policy's own samples). Responses to the same prompt next to each other (an
        evaluation prompt's n samples) share one forward of the prompt (`shared_prompt_logprobs`). Every rank
        must get the same lists (ZeRO-3 forwards are collective), except with `frozen`: the policy is then the
        copy rank 0 froze at its last export (`export_weights(freeze=True)`), whatever steps came since."""
        start = time.perf_counter()
        if frozen and self.frozen is None:
            raise RuntimeError(f"learner rank {self.rank} holds no frozen copy of the policy (export_weights(freeze=True))")
        model = self.frozen if frozen else self.engine
        self.engine.eval()
        groups: list[tuple[list[int], list[list[int]]]] = []
        for p, r in zip(prompts, responses):
            if groups and groups[-1][0] == p:
                groups[-1][1].append(r)
            else:
                groups.append((p, [r]))
        out: list[float] = []
        nll: list[float] = []
        rare: list[float] = []
        budget, batch = 2 * self.cfg.micro_batch_size, []  # response rows a forward takes, as a training micro-batch
        for k, group in enumerate(groups):
            batch.append(group)
            if k + 1 == len(groups) or sum(len(g[1]) for g in batch) + len(groups[k + 1][1]) > budget:
                ps, rs = [g[0] for g in batch], [g[1] for g in batch]
                args = (ps, rs, self.pad_id, self.cfg.max_length)
                layout = pack_responses(*args) if self.packing else False  # one packing for both models
                with self._reference() as reference:
                    tokens, mask = shared_prompt_token_logprobs(reference, *args, packed=layout)
                ref = (tokens * mask).sum(-1)
                if policy:
                    out.extend((shared_prompt_logprobs(model, *args, packed=layout) - ref).tolist())
                counts = mask.sum(-1).clamp(min=1).cpu()
                nll.extend((-ref.cpu() / counts).tolist())
                rare.extend((((tokens < RARE_LOGPROB) * mask).sum(-1).cpu() / counts).tolist())
                batch = []
        self.engine.train()
        return {"ratios": out, "ref_nll": nll, "ref_rare": rare, "seconds": time.perf_counter() - start}

    def forward_flops(self, real_tokens: int, predicted_tokens: int) -> float:
        """Useful FLOPs of one forward: the body's linear layers on every needed position, the output head only
        where a prediction is read (`needed_positions`)."""
        return float(self.body_flops * real_tokens + self.head_flops * predicted_tokens)

    def _pair_layout(self, pairs: list[Pair]) -> Packed | bool:
        """How `_pair_logprobs` computes these pairs, one layout for every model that reads them: each pair's
        prompt once, both responses packed after it in the same forward (`pack_responses`); or full rows, each
        response with its own copy of the prompt (False), where the model's attention does not take the
        packing's mask (`self.packing`)."""
        if not self.packing:
            return False
        return pack_responses([p.prompt_ids for p in pairs], [[p.chosen_ids, p.rejected_ids] for p in pairs],
                              self.pad_id, self.cfg.max_length)

    def _pair_logprobs(self, model, pairs: list[Pair], layout: Packed | bool
                       ) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Summed log-probs of the chosen responses then the rejected ones, computed as `layout`
        (`_pair_layout`); their token counts; the token positions computed and needed, and the positions whose
        logits are read (`needed_positions`: the same for both layouts, so the useful FLOPs are)."""
        cap = self.cfg.max_length
        prompts, responses = [p.prompt_ids for p in pairs], [[p.chosen_ids, p.rejected_ids] for p in pairs]
        tokens, mask = shared_prompt_token_logprobs(model, prompts, responses, self.pad_id, cap, packed=layout)
        if isinstance(layout, Packed):
            computed = layout.ids.numel()
        else:
            computed = 2 * len(pairs) * max(sum(map(len, cut_to_fit(p, r, cap))) for p, rs in zip(prompts, responses)
                                            for r in rs)
        real, head = needed_positions(prompts, responses, cap)
        flat, counts = (tokens * mask).sum(-1), mask.sum(-1).long()
        return torch.cat([flat[0::2], flat[1::2]]), torch.cat([counts[0::2], counts[1::2]]), computed, real, head

    def _pair_losses(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        layout = self._pair_layout(pairs)
        logps, tokens, computed, real, predicted = self._pair_logprobs(self.engine, pairs, layout)
        have_reference = all(p.ref_chosen_logp is not None and p.ref_rejected_logp is not None for p in pairs)
        if have_reference:  # computed once, as the pairs formed
            ref = torch.tensor([p.ref_chosen_logp for p in pairs] + [p.ref_rejected_logp for p in pairs],
                               dtype=logps.dtype, device=logps.device)
        else:
            with torch.no_grad(), self._reference() as reference:
                ref = self._pair_logprobs(reference, pairs, layout)[0]
        n = len(pairs)
        # forward + backward of the policy (3 forwards' worth) and, unless given, one reference forward
        work = dict(computed_tokens=computed, padded_tokens=computed - real,
                    flops=self.forward_flops(real, predicted) * (3 if have_reference else 4))
        return (*dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing,
                          chosen_tokens=tokens[:n], rejected_tokens=tokens[n:]), work)

    # -- weights out --------------------------------------------------------------------------------

    def _full_state_dict(self, to_cpu: bool = True, keep: bool = True, tied: bool = True,
                         copied: bool = True) -> dict[str, torch.Tensor]:
        """Full weights, gathered under ZeRO-3 (every rank must call), cast to the policy dtype; ranks that
        only help the gather (`keep=False`) copy nothing. `tied=False` leaves out a weight that shares its
        storage with one already taken (a tied output head: 28% of a 135M model's bytes), as save_pretrained
        does; every loader of the payload (transformers, vLLM) ties it back. `copied=False`: a tensor already on
        the CPU in the policy dtype is the live weight itself, for a caller that serialises it at once."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        enabled = self.cfg.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=enabled):
            state = (merged_state_dict(module) if self.lora else module.state_dict()) if keep else {}
            skip = set() if tied else set(tied_copies(module.get_base_model() if self.lora else module))
            out = {}
            for k, v in state.items():
                if k in skip:
                    continue
                t = v.detach().to(DTYPES[self.dtype])
                out[k] = t.to("cpu", copy=copied) if to_cpu else t.clone()
        return out

    @in_turn
    def adapter_files(self) -> dict[str, bytes]:
        return self._adapter_files()

    def _adapter_files(self) -> dict[str, bytes]:
        """The adapters in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), by file name:
        `PeftModel.from_pretrained(base, folder)` loads them onto the initial policy. Rank 0's (ZeRO 0-2: every
        rank holds the same); under ZeRO-3 every rank must call (the adapters are gathered), the others get {}."""
        import tempfile

        import deepspeed

        module = self.engine.module
        adapters = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(adapters, modifier_rank=None, enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return {}
            with tempfile.TemporaryDirectory(prefix="odpo-adapter-") as folder:
                module.save_pretrained(folder)
                files = {}
                for name in (WeightBundle.ADAPTER_CONFIG, WeightBundle.ADAPTER_WEIGHTS):
                    with open(os.path.join(folder, name), "rb") as f:
                        files[name] = f.read()
        return files

    def init_nccl_sync(self, generators: list, tensor_parallel_size: int) -> None:
        """Join the NCCL group with the vLLM engines (generator.weight_sync=nccl); every rank calls it."""
        from actors.nccl_sync import NcclWeightSync

        self.nccl_sync = NcclWeightSync(self.engine.module, self.cfg.zero_stage == 3, DTYPES[self.dtype], self.rank,
                                        generators, tensor_parallel_size)

    def send_weights_nccl(self) -> None:
        """Broadcast the current weights into every engine (rank 0 sends, other ranks help gather)."""
        self.nccl_sync.send()

    @in_turn
    def export_weights(self, version: int, freeze: bool = False, adapters: bool = False) -> WeightBundle | None:
        """Rank 0 returns the full weights as version `version` (or with `adapters` only the LoRA adapters, in
        PEFT's format); other ranks help gather and return None. With `freeze`, rank 0 also keeps them as a
        frozen copy of the policy (`log_ratios(frozen=True)`): a deferred evaluation's KL then runs on the weights
        it evaluates while the next round trains."""
        if adapters and not self.lora:
            raise ValueError("export_weights(adapters=True) needs learner.lora")
        # serialised before this call returns, so no copy of the live weights first (ZeRO-3's gathered ones are
        # released as the gather ends: those are copied)
        if adapters:
            files = self._adapter_files()  # gathered by every rank under ZeRO-3
            tensors = {}
        else:
            tensors = self._full_state_dict(keep=self.rank == 0, tied=False, copied=self.cfg.zero_stage == 3)
        if self.rank != 0:
            return None
        if freeze and self.lora:  # the policy as it computes, adapters and all: the KL then equals the live one's
            if self.frozen is None:
                self.frozen = copy.deepcopy(self.engine.module).eval().requires_grad_(False)
            else:  # the base never moves: only the adapters are copied in
                from peft import get_peft_model_state_dict, set_peft_model_state_dict

                set_peft_model_state_dict(self.frozen, get_peft_model_state_dict(self.engine.module))
        if adapters:
            return WeightBundle.of_adapter(version, files)
        if freeze and not self.lora:
            if self.frozen is None:  # the reference's architecture and dtype, the policy's weights
                self.frozen = copy.deepcopy(self.reference)
            missing, unexpected = self.frozen.load_state_dict(tensors, strict=False)
            if unexpected or set(missing) - set(tied_copies(self.frozen)):  # a tied head follows its embedding
                raise RuntimeError(f"the frozen copy does not take the exported weights (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]})")
        return WeightBundle.from_tensors(version, tensors)


def import_muon_without_compiling() -> None:
    """DeepSpeed imports its Muon optimizer on every engine's set-up (to ask whether ours is one), and that
    module wraps three functions in `torch.compile` as it is imported, which imports torch's inductor: 1.6 s
    of a CPU learner's ~7 s start, for an optimizer odpo never uses. Imported here first with DeepSpeed's
    `compiler.compile()` handing out `compiled_on_first_call` instead; every later import finds the module
    loaded."""
    import sys

    from deepspeed.runtime import compiler

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    real, compiler.compile = compiler.compile, lambda: compiled_on_first_call
    try:
        __import__(name)
    except ImportError:  # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        compiler.compile = real


def compiled_on_first_call(fn):
    """`torch.compile(fn)`, built when first called rather than when the decorator runs."""
    compiled = None

    @functools.wraps(fn)
    def first_call_compiles(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)
    return first_call_compiles


def _innermost_optimizer(opt):
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def micro_steps(batch_pairs: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-steps every rank runs for a global batch of `batch_pairs` pairs: what the largest strided slice
    (ceil(batch_pairs / world_size) pairs) needs, so a partial batch runs fewer than a full one."""
    return max(1, math.ceil(math.ceil(batch_pairs / world_size) / micro_batch_size))


def _pair_length(p: Pair) -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def length_grouped(pairs: list[Pair], pad: Pair | None, steps: int) -> list[tuple[list[Pair], list[float]]]:
    """`pairs` sorted by length (prompt + longer response; stable, so the order is reproducible) and cut into
    `steps` contiguous micro-batches of near-equal size, each with its pairs' loss weights (1). A micro-step
    left without a pair gets one `pad` pair of weight 0, so every rank still runs `steps` micro-steps."""
    ordered = sorted(pairs, key=_pair_length)
    out, start = [], 0
    for k in range(steps):
        size = len(ordered) // steps + (k < len(ordered) % steps)
        group = ordered[start: start + size]
        start += size
        if group:
            out.append((group, [1.0] * len(group)))
        elif pad is not None:
            out.append(([pad], [0.0]))
    return out


def matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.3) -> float:
    """FLOP/s of an n^3 matrix product (n = 1024 on CPUs, 4096 on GPUs) at the calling thread count: the
    fastest of the products timed one by one over about `budget_s` seconds after one warm-up product. The
    fastest, not the mean: another process's burst on the same cores only slows some products (a mean over
    0.15 s read 174 GFLOP/s at one run's start-up where the machine, a 2-core AMD EPYC with avx512_bf16, does
    205-211 in bf16)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def forward_flops_per_token(model: torch.nn.Module) -> tuple[int, int]:
    """Multiply-adds x 2 of one token's forward through the model's linear layers: the body's, and the output
    head's (a causal LM's vocabulary projection, counted even when it shares the embedding's weights; 0 for a
    model without one, whose small head is in the body). Attention's score and mixing products are left out
    (a few per cent at odpo's sequence lengths)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_flops = 2 * head.weight.numel() if isinstance(head, torch.nn.Linear) else 0
    total = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total - head_flops, head_flops


class RewardLearner(Learner):
    """A learner rank training a Bradley-Terry reward model (`odpo train-rm`): the same DeepSpeed engine,
    schedule and batching as DPO, with loss -log sigmoid(r_chosen - r_rejected) and no reference model.
    A pair's `chosen_ids` / `rejected_ids` are whole (prompt + response) sequences in the reward model's
    chat template, as the scorer reads them; `prompt_ids` is empty."""

    def _build_reference(self, device: torch.device) -> None:
        self.reference = None

    def _load_trained_model(self):
        from actors.models import load_reward_model

        model = load_reward_model(self.policy_path, "float32", self.trust_remote_code)
        model.config.pad_token_id = self.pad_id  # the score is read at the last non-pad token
        return model

    def ready(self) -> str:
        return f"rm-learner-{self.rank}"

    def _rewards(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        ids, attn, _ = (t.to(self.device) for t in build_sequences([[]] * len(seqs), seqs, self.pad_id,
                                                                    self.cfg.max_length))
        r = self.engine(input_ids=ids, attention_mask=attn).logits[:, 0].float()
        return r[: len(pairs)], r[len(pairs):]

    def _pair_losses(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        chosen, rejected = self._rewards(pairs)
        real = sum(min(len(s), self.cfg.max_length) for p in pairs for s in (p.chosen_ids, p.rejected_ids))
        computed = 2 * len(pairs) * min(self.cfg.max_length, max(len(s) for p in pairs for s in (p.chosen_ids, p.rejected_ids)))
        work = dict(computed_tokens=computed, padded_tokens=computed - real, flops=self.forward_flops(real, 0) * 3)
        return bradley_terry_loss(chosen, rejected, reduction="none"), chosen, rejected, work

    @in_turn
    @torch.no_grad()
    def evaluate(self, pairs: list[Pair]) -> dict:
        """Held-out sums over this rank's slice: pairs ranked right, loss, count."""
        self.engine.eval()
        correct, loss = 0, 0.0
        m = self.cfg.micro_batch_size
        for s in range(0, len(pairs), m):
            chosen, rejected = self._rewards(pairs[s: s + m])
            correct += int((chosen > rejected).sum())
            loss += float(bradley_terry_loss(chosen, rejected, reduction="sum"))
        self.engine.train()
        return {"correct": correct, "loss": loss, "pairs": len(pairs)}


class PairwiseLearner(Learner):
    """A learner rank training a pairwise preference model in RLHFlow's format (`odpo train-rm` with
    reward_training.type=pairwise; actors/preference.py): a causal LM reads both responses in one turn and is
    trained with the next-token loss on the letter of the better one. A pair's `prompt_ids` is that input (the
    two responses in the order drawn for it), `chosen_ids` the right letter's token id, `rejected_ids` the
    other's; no reference model."""

    def _build_reference(self, device: torch.device) -> None:
        self.reference = None

    def _load_trained_model(self):
        return load_causal_lm(self.policy_path, "float32", self.trust_remote_code, self.attention)

    def ready(self) -> str:
        return f"rm-learner-{self.rank}"

    def _letter_logps(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(right letter | input) and log p(other letter | input), over the whole vocabulary."""
        logits = last_token_logits(self.engine, [p.prompt_ids[-self.cfg.max_length:] for p in pairs], self.pad_id,
                                   self.device)
        logp = torch.log_softmax(logits.float(), dim=-1)
        right = torch.tensor([p.chosen_ids[0] for p in pairs], device=logp.device)
        wrong = torch.tensor([p.rejected_ids[0] for p in pairs], device=logp.device)
        rows = torch.arange(len(pairs), device=logp.device)
        return logp[rows, right], logp[rows, wrong]

    def _pair_losses(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        right, wrong = self._letter_logps(pairs)
        real = sum(min(len(p.prompt_ids), self.cfg.max_length) for p in pairs)
        computed = len(pairs) * min(self.cfg.max_length, max(len(p.prompt_ids) for p in pairs))
        work = dict(computed_tokens=computed, padded_tokens=computed - real,
                    flops=self.forward_flops(real, len(pairs)) * 3)  # one prediction a row: the letter
        return -right, right, wrong, work

    @in_turn
    @torch.no_grad()
    def evaluate(self, pairs: list[Pair]) -> dict:
        """Held-out sums over preferences (pairs sharing a uid: one preference in its orders): P(right) from
        the A/B softmax, averaged over the orders as the scorer judges both; right when above 0.5, half a point
        at exactly 0.5; loss: the next-token loss, averaged over the orders."""
        self.engine.eval()
        by_uid: dict[int, list[tuple[float, float]]] = {}
        m = self.cfg.micro_batch_size
        for s in range(0, len(pairs), m):
            right, wrong = self._letter_logps(pairs[s: s + m])
            prob = torch.sigmoid(right - wrong)  # the two-letter softmax
            for p, pr, loss in zip(pairs[s: s + m], prob.tolist(), (-right).tolist()):
                by_uid.setdefault(p.uid, []).append((pr, loss))
        self.engine.train()
        correct, loss = 0.0, 0.0
        for rows in by_uid.values():
            mean = sum(pr for pr, _ in rows) / len(rows)
            correct += 1.0 if mean > 0.5 else 0.5 if mean == 0.5 else 0.0
            loss += sum(x for _, x in rows) / len(rows)
        return {"correct": correct, "loss": loss, "pairs": len(by_uid)}
