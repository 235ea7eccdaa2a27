"""Run by tests/test_distributed.py under torchrun (2 gloo processes) or alone (1 process).

Trains LoRA on a tiny Llama for three SGD steps on one fixed batch of four rows (each of
two ranks takes two), then saves the delta from every rank with ``delta.save``.
Usage: ``train_and_save.py {single,ddp,fsdp} OUT.safetensors``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import llama

import deltahooks as dh


def main(mode: str, out: str) -> None:
    torch.manual_seed(0)
    model, _ = llama()
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2, init="random"))
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(1))
    start = out + ".start.safetensors"
    rank, world = 0, 1
    if mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if rank == 0:
            delta.save(start)  # the untrained delta, to hot-swap back in after training

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        trained = model
    elif mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    rows = ids[rank * 4 // world : (rank + 1) * 4 // world]
    with torch.no_grad():
        untrained = trained(input_ids=rows).logits
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        trained(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("dh__" in n for n in trainable), sorted(trainable)[:3]
    delta.save(out)  # every rank calls it; under FSDP2 it gathers and rank 0 writes
    if mode == "fsdp":  # the file loads into a fresh model that is then sharded
        dist.barrier()
        torch.manual_seed(0)
        fresh, _ = llama()  # the same base weights
        dh.load(fresh, out)
        for layer in fresh.model.layers:
            fully_shard(layer)
        fully_shard(fresh)
        with torch.no_grad():
            want = model(input_ids=rows).logits
            torch.testing.assert_close(fresh(input_ids=rows).logits, want, rtol=0, atol=1e-6)
            # and a file hot-swaps into the sharded delta: each rank keeps its shard
            dh.load(model, start, into=delta)
            torch.testing.assert_close(model(input_ids=rows).logits, untrained, rtol=0, atol=1e-6)
    if mode != "single":
        dist.barrier()
        if rank == 0 and os.path.exists(start):
            os.remove(start)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
