"""Image tasks in ``apriel eval``: a Llava/Pixtral checkpoint scored on prompts that carry images.

The engine is lm-evaluation-harness's multimodal HF backend (``hf-multimodal``, ``HFMultimodalLM``):
it collects each document's images (``doc_to_image``), renders the chat with one image chunk per
``<image>`` placeholder, batches, generates and cuts at the stop strings. Three parts of it do not fit
a Pixtral checkpoint, and this module replaces only those:

- the processor. lm-eval loads ``AutoProcessor``, and transformers' ``PixtralProcessor`` imports
  torchvision, which a CPU install does not have. :class:`PixtralPrompts` does what that processor
  does (the chat template's ``[IMG]`` per image, expanded to one ``[IMG]`` per patch with
  ``[IMG_BREAK]`` after each patch row and ``[IMG_END]`` last; pixels from transformers'
  ``PixtralImageProcessor``, the PIL one) with the settings of the checkpoint folder, exactly as
  ``apriel preprocess-multimodal`` wrote the training samples; ``tests/test_eval_images.py`` checks
  it token for token and pixel for pixel against ``PixtralProcessor``;
- log-likelihood. lm-eval's multimodal ``loglikelihood`` raises ``NotImplementedError`` (its body
  is unfinished), so :meth:`ImageHFLM.loglikelihood` scores each continuation after its context and
  images itself, with lm-eval's conventions (a context's trailing blanks are scored with the
  continuation; the sum of the continuation's token log-probabilities; greedy = every token argmax);
- mixed calls. lm-eval hands a backend the requests of every task in one call and its multimodal
  backend takes the text or the image path by the first request, so a text task beside an image
  task failed; text requests get an empty image list here and take the image path too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_apriel.data.multimodal_format import PLACEHOLDER
from megatron_apriel.errors import InputError
from megatron_apriel.models.families import family_of_hf_config
from megatron_apriel.models.presets import ImageLayout

IMAGE_BREAK, IMAGE_END = "[IMG_BREAK]", "[IMG_END]"  # PixtralProcessor's defaults


class ImageEvalError(InputError):
    """A checkpoint or chat template that cannot take image prompts; one line, exit 2."""


def is_vision_checkpoint(hf_dir: str | Path) -> bool:
    """A folder whose model family (the registry's answer for its config.json) takes images."""
    try:
        return family_of_hf_config(json.loads((Path(hf_dir) / "config.json").read_text())).has_images
    except (OSError, ValueError):
        return False


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _side(value, default: int) -> int:
    """A processor size: an int, or {"longest_edge": n} / {"height": n, "width": n} as saved by transformers."""
    if isinstance(value, dict):
        return int(value.get("longest_edge", value.get("height", default)))
    return int(value) if value is not None else default


class PixtralPrompts:
    """Rendered prompts with ``[IMG]`` per image -> input ids with the images' patch grids, and pixels.

    Settings come from the checkpoint folder: patch size and longest edge from
    ``preprocessor_config.json`` when there is one, else from the vision config; mean and std
    likewise (Pixtral-12B's by default); the image token from ``image_token_index``; the break and
    end tokens from ``processor_config.json`` or Pixtral's defaults, looked up in the tokenizer.
    """

    def __init__(self, hf_dir: str | Path, tokenizer):
        hf_dir = Path(hf_dir)
        cfg = _read_json(hf_dir / "config.json")
        vision = cfg.get("vision_config") or {}
        pre = _read_json(hf_dir / "preprocessor_config.json")
        proc = _read_json(hf_dir / "processor_config.json")
        image_id = cfg.get("image_token_index", cfg.get("image_token_id"))
        if image_id is None:
            raise ImageEvalError(f"{hf_dir / 'config.json'}: no image_token_index")
        self.tokenizer = tokenizer
        self.image_token = tokenizer.convert_ids_to_tokens(int(image_id))
        self.break_token = proc.get("image_break_token", IMAGE_BREAK)
        self.end_token = proc.get("image_end_token", IMAGE_END)
        ids = {}
        for name in (self.break_token, self.end_token):
            i = tokenizer.convert_tokens_to_ids(name)
            if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != name:
                raise ImageEvalError(f"{hf_dir}: the tokenizer has no {name} token (a Pixtral tokenizer has "
                                     "[IMG], [IMG_BREAK] and [IMG_END])")
            ids[name] = i
        defaults = ImageLayout()
        self.layout = ImageLayout(
            patch_size=_side(pre.get("patch_size"), vision.get("patch_size", defaults.patch_size)),
            image_size=_side(pre.get("size"), vision.get("image_size", defaults.image_size)),
            image_token_id=int(image_id), image_break_token_id=ids[self.break_token],
            image_end_token_id=ids[self.end_token],
            image_mean=list(pre.get("image_mean", defaults.image_mean)),
            image_std=list(pre.get("image_std", defaults.image_std)))
        self.image_processor = self.layout.processor()

    @property
    def chat_template(self):
        return self.tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                            **kwargs) -> str:
        """The tokenizer's template on messages whose content is a list of text and image chunks."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message, **kwargs)

    def expand(self, text: str, sizes: list[tuple[int, int]]) -> str:
        """Each ``[IMG]`` of ``text`` replaced by its image's rows (PixtralProcessor's layout)."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(sizes):
            raise ValueError(f"{len(pieces) - 1} {self.image_token} in the prompt for {len(sizes)} images")
        out = [pieces[0]]
        for (h, w), piece in zip(sizes, pieces[1:]):
            rows, cols = h // self.layout.patch_size, w // self.layout.patch_size
            grid = [self.image_token * cols + self.break_token] * rows
            grid[-1] = self.image_token * cols + self.end_token
            out += grid + [piece]
        return "".join(out)

    def pixels(self, images: list) -> dict:
        """``pixel_values`` (padded to the largest image) and ``image_sizes`` of resized images."""
        if not images:
            return {}
        out = self.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def ids(self, text: str, sizes: list[tuple[int, int]]) -> list[int]:
        """Token ids of a prompt; the template already wrote BOS, so none is added."""
        ids = self.tokenizer(self.expand(text, sizes), add_special_tokens=False)["input_ids"]
        want = sum((h // self.layout.patch_size) * (w // self.layout.patch_size) for h, w in sizes)
        if sum(i == self.layout.image_token_id for i in ids) != want:
            raise ValueError(f"the prompt encodes to a different number of {self.image_token} tokens than its "
                             f"images have patches ({self.image_token} is not a special token of the tokenizer?)")
        return ids

    def __call__(self, text=None, images=None, padding="longest", return_tensors="pt", truncation=False, **_):
        """lm-eval's processor call: a string or a batch of strings and their images (flat, in order)."""
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        pix = self.pixels(images)
        sizes = [tuple(int(x) for x in s) for s in pix.get("image_sizes", [])]
        rows, k = [], 0
        for t in texts:
            n = t.count(self.image_token)
            rows.append(self.ids(t, sizes[k:k + n]))
            k += n
        if k != len(images):
            raise ValueError(f"{k} {self.image_token} in the prompts for {len(images)} images")
        enc = self.tokenizer.pad({"input_ids": rows}, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**enc, **pix}, tensor_type=return_tensors)


def image_hflm():
    """lm-eval's ``HFMultimodalLM`` with :class:`PixtralPrompts` and log-likelihood (the class, built on demand:
    lm-evaluation-harness is optional)."""
    import transformers
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class ImageHFLM(HFMultimodalLM):
        def __init__(self, pretrained: str, **kwargs):
            # decoder-only: lm-eval's text fallbacks slice logits as for a causal LM
            super().__init__(pretrained, backend="causal", **kwargs)

        def _create_tokenizer(self, pretrained, tokenizer, revision="main", trust_remote_code=False, **kwargs):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained, revision=revision,
                                                                        trust_remote_code=trust_remote_code)
            self.processor = PixtralPrompts(pretrained, self.tokenizer)

        def check_chat_template(self) -> None:
            """The template renders an image chunk as the image token (Apriel-1.5's does; text-only ones do not)."""
            probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
            try:
                n = self.processor.apply_chat_template(probe).count(self.image_token)
            except Exception as e:  # a template that cannot render list content at all
                raise ImageEvalError(f"the chat template cannot render an image chunk ({type(e).__name__}: {e}); "
                                     "use --chat-template apriel-1.5") from None
            if n != 1:
                raise ImageEvalError(f"the chat template renders an image chunk as {n} {self.image_token}, not 1; "
                                     "use a template that renders images (--chat-template apriel-1.5)")

        @staticmethod
        def _with_images(requests):
            """lm-eval sends the requests of all tasks in one call, and its multimodal backend takes the path of
            the first; a text task's requests get an empty image list, so every request takes the image path."""
            for r in requests:
                if len(r.arguments) < 3:
                    r.arguments = (*r.arguments, {"visual": []})
            return requests

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(self._with_images(requests), disable_tqdm=disable_tqdm)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            requests = self._with_images(requests)
            out = []
            for start in range(0, len(requests), self.batch_size):
                out += self._score_batch([r.args for r in requests[start:start + self.batch_size]])
            return out

        def _score_batch(self, batch) -> list[tuple[float, bool]]:
            """(sum of continuation log-probs, continuation is greedy) per (context, continuation, images);
            rows right-padded, so every scored position sees only its own row's prefix."""
            proc, rows, spans, images = self.processor, [], [], []
            for context, continuation, aux in batch:
                n = len(context) - len(context.rstrip())  # lm-eval's convention for trailing blanks
                if n:
                    context, continuation = context[:-n], context[-n:] + continuation
                imgs = list(aux.get("visual") or [])
                if not self.chat_applied:  # raw prompts: lm-eval's <image> placeholder is the image token
                    context = context.replace(PLACEHOLDER, self.image_token)
                sizes = [tuple(int(x) for x in s) for s in proc.pixels(imgs).get("image_sizes", [])]
                # as lm-eval's _encode_pair: the continuation is what the whole has beyond the context's length
                n_ctx, whole = len(proc.ids(context, sizes)), proc.ids(context + continuation, sizes)
                if not 0 < n_ctx < len(whole):
                    raise ValueError(f"empty context or continuation: {context[-40:]!r} + {continuation!r}")
                rows.append(whole)
                spans.append((n_ctx, len(whole)))
                images += imgs
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            pix = proc.pixels(images)
            if pix:
                pix["pixel_values"] = pix["pixel_values"].to(self.device, self.model.dtype)
                pix["image_sizes"] = pix["image_sizes"].to(self.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **pix).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            out = []
            for i, (a, b) in enumerate(spans):
                cont = ids[i, a:b].to(self.device)
                lp = logp[i, a - 1:b - 1]
                out.append((float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all())))
            return out

    return ImageHFLM
