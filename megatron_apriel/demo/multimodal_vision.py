"""The multimodal demo's vision encoder, pretrained before the chain starts.

Apriel-1.5 starts from Pixtral, whose vision encoder comes pretrained: realignment fits the projector
to features that already describe the image, and the later stages read them. Nothing is downloaded
here, so the tiny Pixtral encoder of the text base is pretrained on the spot, on pictures of the
training split only: a linear head on each patch's output feature names what that patch holds
(white, or the colour of its square), as a classifier's pretraining would, with the whole encoder
trained. The head is thrown away; the encoder's weights replace the base's (random) ones in a copy
of its HF folder, which the chain then upscales. What the encoder learns is what a patch shows, not
the questions: counting, positions and the answer format are left to the chain's stages.

transformers' ``PixtralVisionModel`` is the encoder of an HF Llava folder (``vision_tower.*``), so the
weights go back in that folder unchanged in layout, and megatron-core reads them through ``apriel
convert hf-to-mcore`` as it reads Pixtral's.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_apriel.demo.multimodal_data import CELL, COLOURS, GRID, SIZE, draw_squares, render_image
from megatron_apriel.models.presets import ImageLayout

PREFIX = "vision_tower."
CLASSES = ("white", *COLOURS)  # what a patch holds


def _pictures(rng: random.Random, n: int, held_out: bool) -> tuple[list[Image.Image], torch.Tensor]:
    """``n`` drawn pictures of one split and each patch's class (row-major, ``GRID * GRID`` each)."""
    images, labels = [], []
    for _ in range(n):
        squares = draw_squares(rng, rng.randint(1, 4), held_out)
        images.append(render_image(squares))
        cls = [0] * (GRID * GRID)
        for s in squares:
            cls[s.cell] = 1 + list(COLOURS).index(s.colour)
        labels.append(cls)
    return images, torch.tensor(labels)


def pretrain_encoder(base_hf: Path, out_hf: Path, steps: int, batch: int = 32, lr: float = 3e-3,
                     seed: int = 0) -> dict:
    """Train ``base_hf``'s vision tower on patch classes and write ``out_hf``: ``base_hf`` with the
    trained tower. Returns the loss and the held-out patch accuracy (pictures of the held-out split)."""
    from safetensors.torch import load_file, save_file
    from transformers import PixtralVisionConfig, PixtralVisionModel

    torch.manual_seed(seed)
    cfg = json.loads((base_hf / "config.json").read_text())
    encoder = PixtralVisionModel(PixtralVisionConfig(**cfg["vision_config"]))
    weights = load_file(base_hf / "model.safetensors")
    missing, unexpected = encoder.load_state_dict(
        {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}, strict=False)
    if unexpected or any(not k.endswith("inv_freq") for k in missing):
        raise RuntimeError(f"{base_hf}: vision tower keys do not match PixtralVisionModel "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    assert encoder.config.patch_size == CELL, "one patch per cell"
    head = torch.nn.Linear(encoder.config.hidden_size, len(CLASSES))
    processor = ImageLayout(patch_size=CELL, image_size=SIZE).processor()  # as preprocess-multimodal makes pixels
    sizes = [[SIZE, SIZE]]

    def logits(images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.as_tensor(np.stack(processor(images, return_tensors="np")["pixel_values"]))
        feats = encoder(pixel_values=pixels, image_sizes=torch.tensor(sizes * len(images))).last_hidden_state
        return head(feats.reshape(len(images) * GRID * GRID, -1))

    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng, start, losses = random.Random(seed), time.time(), []
    encoder.train()
    for step in range(1, steps + 1):
        images, labels = _pictures(rng, batch, held_out=False)
        loss = torch.nn.functional.cross_entropy(logits(images), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"    step {step}/{steps} | patch-class loss {loss.item():.4f} | "
                  f"{step * batch / (time.time() - start):.0f} pictures/s", flush=True)
    encoder.eval()
    with torch.no_grad():
        images, labels = _pictures(random.Random(seed + 1), 256, held_out=True)
        pred = logits(images).argmax(-1)
        labels = labels.reshape(-1)
        accuracy = (pred == labels).float().mean().item()
        coloured = labels > 0
        square_accuracy = (pred[coloured] == labels[coloured]).float().mean().item()
    print(f"  encoder: held-out patch accuracy {accuracy:.3f} (patches with a square: {square_accuracy:.3f}) "
          f"on 256 pictures of the held-out split", flush=True)

    tmp = out_hf.with_name(out_hf.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(base_hf, tmp)
    weights.update({PREFIX + k: v.detach().contiguous() for k, v in encoder.state_dict().items()
                    if PREFIX + k in weights})
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    if out_hf.exists():
        shutil.rmtree(out_hf)
    tmp.rename(out_hf)
    k = max(1, len(losses) // 10)
    return {"loss": sum(losses[-k:]) / k, "first_loss": losses[0], "iterations": steps,
            "patch_accuracy": accuracy, "square_patch_accuracy": square_accuracy,
            "loss_curve": list(enumerate(losses, 1))}
