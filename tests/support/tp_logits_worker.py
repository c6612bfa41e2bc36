"""Logits of a checkpoint's model at tensor parallelism, for the conversion tests.

    torchrun --nproc_per_node T tests/support/tp_logits_worker.py CHECKPOINT IDS.pt OUT.pt

Every rank builds its TP shard of the model with megatron-core's layers, takes its shard of each
tensor from the checkpoint (pretrain/checkpoint/format.py reshards), runs the forward on the ids
and gathers the vocab-parallel logits; rank 0 saves the full [b, s, V] logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    checkpoint, ids_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    from megatron.core import parallel_state, tensor_parallel

    from mesh_model.config import ModelConfig
    from mesh_model.model import ModelParallelism, build_model
    from pretrain.checkpoint import format as ckpt
    from pretrain.compat import apply_cpu_shim

    apply_cpu_shim()
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    rank = parallel_state.get_tensor_model_parallel_rank()
    meta = ckpt.read_meta(checkpoint)
    model = build_model(ModelConfig.from_dict(meta.model), ModelParallelism(tensor=tp)).eval()
    file = ckpt.file_cache(checkpoint)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = ckpt.reshard(checkpoint, name, meta.tensors[name], file, tp_size=tp, tp_rank=rank)["param"]
            param.copy_(shard)
    ids = torch.load(ids_path)
    seq = ids.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        local = model(ids, positions, mask)  # [b, s, V / tp]
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous())
    if dist.get_rank() == 0:
        torch.save(torch.cat(pieces, dim=-1), out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
