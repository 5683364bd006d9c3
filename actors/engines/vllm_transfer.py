"""vLLM's weight-update protocol on a transport that runs anywhere: the `ponder_rpc` weight-transfer backend.

vLLM 0.32 updates a live engine's weights in ONE session per version: `AsyncLLM.start_weight_update()`, then
`update_weights(request)` per chunk, then `finish_weight_update(version)`; its layer-wise reload rebuilds each
layer once it holds all its tensors, so chunks may split a fused layer (q/k/v, gate/up). vLLM's own transports
(`vllm/distributed/weight_transfer/`: NCCL, CUDA IPC) need GPUs; this backend carries each chunk's tensors inside
the RPC message, for CPU engines and small models. `VLLMEngine` names it in `weight_transfer_config` and names
`WeightSyncWorker` as the worker extension: vLLM imports this module in its worker process (to resolve the
extension) before it loads the model, which registers the backend there. Imports vLLM: import it only where vLLM
runs.
"""
from __future__ import annotations

RPC_BACKEND = "ponder_rpc"


def encode_tensor(name: str, t) -> tuple:
    """A tensor as (name, dtype name, shape, raw bytes): vLLM's RPC encoder turns a tensor inside a dict argument
    into nested lists."""
    import torch

    t = t.detach().cpu().contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes()


def decode_tensor(dtype: str, shape: list, raw: bytes, device):
    import torch

    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape).to(device)


class WeightSyncWorker:
    """vLLM worker extension (`worker_extension_cls`). Importing this module in vLLM's worker process (vLLM
    resolves the extension before it loads the model) also registers the `ponder_rpc` weight-transfer backend."""


def _register_rpc_backend() -> None:
    """vLLM's weight-transfer protocol (start -> chunks -> finish, `AsyncLLM.*_weight_update`) with the chunks'
    tensors carried in the RPC message itself, so it runs where NCCL and CUDA IPC do not (CPU, tests). The engine
    does what vLLM's NCCL engine does around the transport: `initialize_layerwise_reload` at start, the model's own
    `load_weights` (HF names onto fused layers) per chunk, `finalize_layerwise_reload` at finish."""
    from dataclasses import dataclass, field

    from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    @dataclass
    class RPCInitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class RPCUpdateInfo(WeightTransferUpdateInfo):
        tensors: list = field(default_factory=list)  # [(name, dtype name, shape, raw bytes)]

    class RPCWeightTransferEngine(WeightTransferEngine[RPCInitInfo, RPCUpdateInfo]):
        init_info_cls = RPCInitInfo
        update_info_cls = RPCUpdateInfo

        def init_transfer_engine(self, init_info) -> None:
            pass

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info) -> None:  # the base's accelerator sync has no device on CPU
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info) -> None:
            self.model.load_weights((name, decode_tensor(dtype, shape, raw, self.device))
                                    for name, dtype, shape, raw in update_info.tensors)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            pass

    if RPC_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(RPC_BACKEND, RPCWeightTransferEngine)


_register_rpc_backend()
