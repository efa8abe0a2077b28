"""The GRPO update of the tiny model under torch FSDP2 on gloo (``torch.distributed.run
--nproc_per_node 2 tests/fsdp_grpo_check.py OUT.pt``) or in one process (``train_steps(None)``),
for tests/test_grpo_scale.py. Same wrap units as examples/apriel_nemotron_15b/accelerate_fsdp.yaml."""

from __future__ import annotations

import sys

import torch

BATCH, SEQ, VOCAB = 8, 12, 16


def build_model():
    from transformers import MistralForCausalLM

    from megatron_apriel.models import get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=2).hf_config(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MistralForCausalLM(cfg)


def grpo_loss(model, ids, advantages):
    """GRPO's objective at its first iteration (ratio 1, no clipping active): -A x log p(token)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(advantages[:, None] * logp).mean()


def train_steps(rows: slice | None, steps: int = 3, shard: bool = False) -> dict:
    torch.manual_seed(1)
    ids, adv = torch.randint(3, VOCAB, (BATCH, SEQ)), torch.randn(BATCH)
    rows = rows or slice(None)
    model = build_model()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        grpo_loss(model, ids[rows], adv[rows]).backward()
        opt.step()
    state = model.state_dict()
    if shard:
        emb = model.model.embed_tokens.weight
        print(f"rank {torch.distributed.get_rank()}: DTensor shard {emb.to_local().shape} of {emb.shape}", flush=True)
        state = {k: v.full_tensor() for k, v in state.items()}
    return {k: v.detach().clone() for k, v in state.items()}


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = train_steps(slice(rank * BATCH // world, (rank + 1) * BATCH // world), shard=True)
    if rank == 0:
        torch.save(state, sys.argv[1])
    dist.destroy_process_group()
