"""Run under torchrun: HF Llava -> dist checkpoint at --tp/--pp, load it into the LlavaModel built at
that layout, write the logits of an image batch and whether the gathered weights equal the HF table.

Used by tests/test_llava.py.
"""

import argparse
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    import torch
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_apriel.checkpoint.convert import hf_to_mcore_checkpoint
    from megatron_apriel.checkpoint.llava import HUB_LAYOUT, gather_llava_canonical, hf_to_mcore, preset_from_hf_config
    from megatron_apriel.models.llava import build_llava_chunks

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_llava import SIZES, image_batch

    hf_to_mcore_checkpoint(args.hf, args.ckpt, tp=args.tp, pp=args.pp, dtype="fp32")
    preset = preset_from_hf_config(AutoConfig.from_pretrained(args.hf))
    chunks = build_llava_chunks(preset, preset.transformer_config(tp=args.tp, pp=args.pp, device="cpu"))
    for p in chunks[0].parameters():  # a tensor the load misses cannot pass by accident
        p.data.fill_(float("nan"))
    state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, args.ckpt)
    chunks[0].load_state_dict(state["model"])
    chunks[0].eval()

    tokens, pixels, sizes = image_batch(preset, SIZES, seq_len=40)
    b, s = tokens.shape
    store = []

    def step(data_iterator, model):
        item = next(data_iterator)
        pos = torch.arange(s).unsqueeze(0).expand(b, -1)
        out = model(item["tokens"], pos, None, pixel_values=item["pixel_values"], image_sizes=item["image_sizes"])

        def keep(output_tensor):
            store.append(gather_from_tensor_model_parallel_region(output_tensor))
            return torch.zeros(()), {}

        return out, keep

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([{"tokens": tokens, "pixel_values": pixels, "image_sizes": sizes}]),
            model=chunks[0], num_microbatches=1, seq_length=s, micro_batch_size=b, decoder_seq_length=s,
            forward_only=True)

    hf_tensors = load_file(str(Path(args.hf) / "model.safetensors"))
    expected = dict(hf_to_mcore(hf_tensors.__getitem__, preset, HUB_LAYOUT))
    gathered = gather_llava_canonical(chunks, preset)
    mismatched = sorted(k for k, v in expected.items() if k not in gathered or not torch.equal(gathered[k], v.float()))
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": store[0][..., : preset.vocab_size].clone(), "mismatched": mismatched,
                    "compared": len(expected)}, args.out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
