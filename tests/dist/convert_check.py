"""Run under torchrun: HF -> dist checkpoint at --tp/--pp, then load checkpoints into the model built
at that layout with megatron-core's dist_checkpointing and write the logits (rank holding them).

Used by tests/test_convert.py; ``--load`` adds checkpoints written at another layout (resharding).
"""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ckpt", required=True, help="written here at --tp/--pp")
    ap.add_argument("--out", required=True, help="torch.save of {checkpoint: logits}")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--load", nargs="*", default=[], help="more checkpoints to load at this layout")
    args = ap.parse_args()

    import torch
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_apriel.checkpoint.convert import hf_to_mcore_checkpoint, preset_from_hf_dir
    from megatron_apriel.models.builder import build_model_chunks
    from megatron_apriel.training.step import forward_logits

    hf_to_mcore_checkpoint(args.hf, args.ckpt, tp=args.tp, pp=args.pp, dtype="fp32")
    preset = preset_from_hf_dir(args.hf)
    tokens = torch.randint(0, preset.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for ckpt in [args.ckpt, *args.load]:
        config = preset.transformer_config(tp=args.tp, pp=args.pp, device="cpu")
        chunks = build_model_chunks(preset, config)
        for p in chunks[0].parameters():  # a load that misses a tensor cannot pass by accident
            p.data.fill_(float("nan"))
        state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, ckpt)
        chunks[0].load_state_dict(state["model"])
        for c in chunks:
            c.eval()
        logits = forward_logits(chunks, tokens)
        if logits is not None:
            results[ckpt] = logits[..., : preset.vocab_size].clone()
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"tokens": tokens, "logits": results}, args.out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
