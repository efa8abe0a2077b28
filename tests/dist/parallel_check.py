"""Run under torchrun (or as one process): logits, loss and one optimizer step of a tiny HF Mistral
loaded into megatron-core at a given TP/PP/DP layout. Rank 0 writes the results with torch.save.

Used by tests/test_parallel.py; each layout's results are compared with the TP=1 single-process run.
"""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--sequence-parallel", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import MistralForCausalLM

    from megatron_apriel.checkpoint.mistral import gather_canonical, hf_to_mcore, load_canonical_into_chunks
    from megatron_apriel.models.builder import build_model_chunks
    from megatron_apriel.models.presets import ModelPreset
    from megatron_apriel.runtime import init_distributed
    from megatron_apriel.training.optimizer import OptimConfig, build_optimizer, wrap_ddp
    from megatron_apriel.training.step import forward_logits, train_step
    from megatron.core import parallel_state

    env = init_distributed(tp=args.tp, pp=args.pp, vpp=args.vpp, device="cpu", seed=0)
    hf = MistralForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
    preset = ModelPreset.from_hf_config(hf.config)
    canonical = dict(hf_to_mcore(hf.state_dict().__getitem__, preset))
    del hf
    initial = {k: v.clone() for k, v in canonical.items()}

    config = preset.transformer_config(tp=args.tp, pp=args.pp, vpp=args.vpp, sequence_parallel=args.sequence_parallel)
    chunks = build_model_chunks(preset, config)
    load_canonical_into_chunks(chunks, canonical, preset)

    gen = torch.Generator().manual_seed(123)
    global_batch, seq = 4, 32
    tokens = torch.randint(0, preset.vocab_size, (global_batch, seq + 1), generator=gen)
    loss_mask = (torch.rand(global_batch, seq, generator=gen) > 0.3).float()

    logits = forward_logits(chunks, tokens[:, :-1])

    optim = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=args.distributed_optimizer)
    ddp = wrap_ddp(chunks, config, optim)
    optimizer = build_optimizer(ddp, config, optim)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_dp = global_batch // dp_size
    mine = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    mbs = args.micro_batch_size
    batches = []
    for start in range(mine.start, mine.stop, mbs):
        sl = slice(start, start + mbs)
        batches.append(
            {
                "tokens": tokens[sl, :-1],
                "labels": tokens[sl, 1:],
                "loss_mask": loss_mask[sl],
                "position_ids": torch.arange(seq).unsqueeze(0).expand(mbs, -1),
            }
        )
    n_mb = len(batches)
    its = [iter(batches) for _ in ddp] if len(ddp) > 1 else iter(batches)
    result = train_step(ddp, optimizer, its, n_mb, seq, mbs)
    weights = gather_canonical(ddp, preset)

    if logits is not None and parallel_state.get_data_parallel_rank() == 0:
        logits = logits[..., : preset.vocab_size]
        torch.save({"logits": logits, "loss": result.loss, "grad_norm": result.grad_norm,
                    "weights": weights, "initial": initial}, args.out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
