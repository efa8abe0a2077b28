"""bf16 logits of our megatron-core model and of transformers against the fp32 HF model, on one
device (run under torchrun with one process: ``parity_check.py HF_DIR OUT.json DEVICE``)."""

import json
import sys

import torch


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(hf_dir: str, out: str, device: str) -> None:
    from transformers import MistralForCausalLM

    from megatron_apriel.checkpoint.mistral import hf_to_mcore, load_canonical_into_chunks
    from megatron_apriel.models.builder import build_gpt_model
    from megatron_apriel.models.presets import ModelPreset
    from megatron_apriel.runtime import init_distributed

    init_distributed(device=device, seed=0)
    ref = MistralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    hf16 = MistralForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    preset = ModelPreset.from_hf_config(ref.config)
    tokens = torch.randint(0, preset.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand(2, -1)
    result = {}
    with torch.no_grad():
        fp32 = ref(tokens).logits
        result["hf_bf16_vs_fp32"] = rel(hf16(tokens).logits, fp32)
        for name, dtype in (("ours_fp32_vs_fp32", torch.float32), ("ours_bf16_vs_fp32", torch.bfloat16)):
            cfg = preset.transformer_config(params_dtype=dtype, bf16=dtype == torch.bfloat16, device=device)
            model = build_gpt_model(preset, cfg)
            sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
            load_canonical_into_chunks([model], dict(hf_to_mcore(sd.__getitem__, preset)), preset)
            model = model.to(device).eval()
            logits = model(tokens, pos, None)[..., : preset.vocab_size]
            result[name] = rel(logits, fp32)
            if dtype == torch.bfloat16:
                result["top1_agreement"] = (logits.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
