"""The multimodal demo's pictures, questions and text, drawn on the spot so nothing is downloaded.

Pictures: 16 x 16 pixels, white, holding one to four squares (2 x 2 or 3 x 3 pixels, at any offset
that keeps them inside their cell) in red, green, blue or yellow, each inside its own 4 x 4 cell of
the image's 4 x 4 grid. The cells are the tiny vision encoder's patches (patch 4), so one patch sees
at most one square; a picture is 16 image tokens and 4 row breaks. Every picture comes with its
objects (colour, cell, box), from which are made:

* captions (projector realignment and CPT stage 1): "two squares: a red one at the top left, ...";
* COCO instances JSON, so ``data_prep/synthetic_visual.py`` (CPT stage 2) can make its counting and
  presence tasks on these pictures as it does on COCO (category = "<colour> square");
* four-choice questions of four kinds: ``colour`` (of the one square), ``count`` (squares, 1-4),
  ``position`` (quadrant of the one square) and ``matching`` (which of four colour lists matches the
  picture's squares, in reading order).

Held-out pictures: a fixed hash of a picture's layout (every square's colour, cell, size and offset)
sends a fifth of all layouts to the held-out split, and pictures are drawn only from their own
split, so a test picture is one the training never saw. (Held-out layouts drawn first and kept out of
training did not do: a picture of one 3 x 3 square at a fixed place had 64 layouts, the test's draws
took nearly all of them, and the questions about one square trained on the two that were left.)

Text problems: "Which number is the largest: 3, 8, 1 or 5?" over four different digits. A fixed hash
of the digits' order sends a fifth of the orders to the held-out split.

Questions of both kinds are written in ``apriel eval``'s ``choice`` layout (question, a blank line,
"A. ..." lines, "Answer:") and answered by the choice's text, so the training text and
``choice_ll`` scoring read the same; loss is on the answer only where a stage trains on questions.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_apriel.data.chat_template import APRIEL_15_CHAT_TEMPLATE, FORMAT_TOKENS
from megatron_apriel.demo.data import save_bpe, write_jsonl
from megatron_apriel.eval.tasks import LETTERS

SIZE, CELL = 16, 4  # pixels; CELL is the vision encoder's patch
GRID = SIZE // CELL
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (235, 200, 0)}
COUNT_WORDS = ("one", "two", "three", "four")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
VISUAL_KINDS = ("colour", "count", "position", "matching")
# Pixtral's image tokens sit at 10/12/13 (the tiny-llava preset's ids); the other low ids are
# fillers, the role tokens follow so the Apriel-1.5 template costs one token per marker.
SPECIAL_TOKENS = (["<unk>", "<s>", "</s>"] + [f"<sp{i}>" for i in range(3, 10)]
                  + ["[IMG]", "<sp11>", "[IMG_BREAK]", "[IMG_END]", "<pad>", "<sp15>"]
                  + list(FORMAT_TOKENS))
MARKERS = ["[BEGIN FINAL RESPONSE]", "[END FINAL RESPONSE]", "Here are my reasoning steps:"]


SIDES = (2, 3)  # pixels: a square's side; it sits anywhere in its cell


@dataclass(frozen=True)
class Square:
    colour: str
    cell: int  # 0..15, row-major
    side: int = 3
    dx: int = 0  # offset in its cell, 0..CELL - side
    dy: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 (inclusive) of the square."""
        r, c = divmod(self.cell, GRID)
        x0, y0 = c * CELL + self.dx, r * CELL + self.dy
        return x0, y0, x0 + self.side - 1, y0 + self.side - 1

    @property
    def quadrant(self) -> str:
        r, c = divmod(self.cell, GRID)
        return QUADRANTS[2 * (r >= GRID // 2) + (c >= GRID // 2)]


def layout_key(squares: tuple[Square, ...]) -> str:
    return ",".join(f"{s.colour}@{s.cell}:{s.side}+{s.dx}+{s.dy}" for s in sorted(squares, key=lambda s: s.cell))


def held_out_layout(squares: tuple[Square, ...]) -> bool:
    """Whether a picture belongs to the held-out split (a fifth of all layouts, by a fixed hash)."""
    return hashlib.sha256(layout_key(squares).encode()).digest()[0] % 5 == 0


def _square(rng: random.Random, cell: int) -> Square:
    side = rng.choice(SIDES)
    return Square(rng.choice(list(COLOURS)), cell, side, rng.randint(0, CELL - side), rng.randint(0, CELL - side))


def draw_squares(rng: random.Random, n: int, held_out: bool = False) -> tuple[Square, ...]:
    """``n`` squares in distinct cells, in reading order, from the held-out split or the training one."""
    while True:
        squares = tuple(sorted((_square(rng, c) for c in rng.sample(range(GRID * GRID), n)), key=lambda s: s.cell))
        if held_out_layout(squares) == held_out:
            return squares


def render_image(squares: tuple[Square, ...]) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    for s in squares:
        d.rectangle(s.box, fill=COLOURS[s.colour])
    return im


def render(squares: tuple[Square, ...], path: Path) -> None:
    render_image(squares).save(path)


def caption(squares: tuple[Square, ...]) -> str:
    if len(squares) == 1:
        s = squares[0]
        return f"One square: a {s.colour} one at the {s.quadrant}."
    parts = ", ".join(f"a {s.colour} one at the {s.quadrant}" for s in squares)
    return f"{COUNT_WORDS[len(squares) - 1].capitalize()} squares: {parts}."


def choice_text(question: str, choices: list[str]) -> str:
    """The prompt ``apriel eval``'s ``choice_ll`` kind builds from a record (tasks.user_text)."""
    return "\n".join([question, ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]) + "\nAnswer:"


def _options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    """Four choices with ``right`` at a random place; the others from ``pool`` (fixed order when the
    pool is exactly four, so the choice order itself carries no hint)."""
    if len(pool) == 4:
        return list(pool), pool.index(right)
    others = rng.sample([p for p in pool if p != right], 3)
    at = rng.randrange(4)
    return others[:at] + [right] + others[at:], at


def visual_question(kind: str, rng: random.Random, held_out: bool) -> tuple[tuple[Square, ...], dict]:
    """A picture for a question of ``kind`` from the held-out or the training split, and the question."""
    n = rng.randint(1, 4) if kind == "count" else 2 if kind == "matching" else 1
    squares = draw_squares(rng, n, held_out)
    if kind == "colour":
        q, (choices, at) = "What colour is the square?", _options(rng, squares[0].colour, list(COLOURS))
    elif kind == "count":
        q, (choices, at) = "How many squares are there?", _options(rng, str(n), ["1", "2", "3", "4"])
    elif kind == "position":
        q, (choices, at) = "Where is the square?", _options(rng, squares[0].quadrant, list(QUADRANTS))
    else:
        right = " and ".join(s.colour for s in squares)
        pool = sorted({f"{a} and {b}" for a in COLOURS for b in COLOURS} - {right})
        q = "Which colours are the squares, in reading order?"
        choices, at = _options(rng, right, [right] + pool)
    return squares, {"question": q, "choices": choices, "answer": LETTERS[at], "kind": kind}


# ------------------------------------------------------------------------------ text problems
def _held_out(digits: tuple[int, ...]) -> bool:
    return hashlib.sha256(",".join(map(str, digits)).encode()).digest()[0] % 5 == 0


def text_problem(rng: random.Random, held_out: bool) -> dict:
    while True:
        digits = tuple(rng.sample(range(10), 4))
        if _held_out(digits) == held_out:
            break
    q = f"Which number is the largest: {digits[0]}, {digits[1]}, {digits[2]} or {digits[3]}?"
    return {"question": q, "choices": [str(d) for d in digits], "answer": LETTERS[digits.index(max(digits))],
            "kind": "largest"}


def answered(rec: dict) -> tuple[str, str]:
    """(prompt, response) of a question record: the response is the right choice's text."""
    return choice_text(rec["question"], rec["choices"]), " " + rec["choices"][LETTERS.index(rec["answer"])]


# ------------------------------------------------------------------------------ everything on disk
@dataclass
class Sizes:
    train_pictures: int  # captioned pictures (realignment, CPT stage 1)
    stage2_pictures: int  # pictures for synthetic_visual.py and the training questions
    text_docs: int  # text problems (base, replay, stage 1 text)
    sft: int  # chat conversations of text-only SFT
    n_test: int  # held-out questions per kind


def make_all(out: Path, sizes: Sizes, seed: int = 0) -> dict:
    """Write every source of the demo under ``out``; returns the record counts."""
    out.mkdir(parents=True, exist_ok=True)
    img = out / "images"
    img.mkdir(exist_ok=True)
    rng = random.Random(seed)
    counts: dict[str, int] = {}

    # held-out questions: pictures of the held-out split only (held_out_layout)
    held = {}
    trng = random.Random(seed + 1)
    for kind in VISUAL_KINDS:
        rows = []
        for i in range(sizes.n_test):
            squares, rec = visual_question(kind, trng, held_out=True)
            name = f"test_{kind}_{i:04d}.png"
            render(squares, img / name)
            rows.append({**rec, "images": [f"images/{name}"]})
        held[kind] = rows
    for kind, rows in held.items():
        counts[f"test_{kind}"] = write_jsonl(out / f"test_{kind}.jsonl", rows)
    counts["test_text"] = write_jsonl(out / "test_text.jsonl",
                                      (text_problem(trng, held_out=True) for _ in range(sizes.n_test)))

    # captions: realignment and CPT stage 1 (full-text loss, the caption follows the picture)
    caps = []
    for i in range(sizes.train_pictures):
        squares = draw_squares(rng, rng.randint(1, 4))
        name = f"cap_{i:05d}.png"
        render(squares, img / name)
        caps.append({"images": [f"images/{name}"], "text": "<image>" + caption(squares)})
    counts["captions"] = write_jsonl(out / "captions.jsonl", caps)

    # CPT stage 2 pictures, with COCO boxes for synthetic_visual.py, and the four-choice questions
    raw = out / "stage2_raw"
    raw.mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": f"{c} square", "supercategory": "square"}
                           for i, c in enumerate(COLOURS)]}
    cat_id = {c: i + 1 for i, c in enumerate(COLOURS)}
    questions = []
    for i in range(sizes.stage2_pictures):
        kind = VISUAL_KINDS[i % len(VISUAL_KINDS)]
        squares, rec = visual_question(kind, rng, held_out=False)
        name = f"s2_{i:05d}.png"
        render(squares, raw / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for s in squares:
            x0, y0, x1, y1 = s.box
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": cat_id[s.colour], "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                                        "area": s.side * s.side, "iscrowd": 0})
        prompt, response = answered(rec)
        questions.append({"images": [f"stage2_raw/{name}"], "prompt": "<image>" + prompt, "response": response,
                          "kind": kind})
    (out / "stage2_coco.json").write_text(json.dumps(coco) + "\n")
    counts["stage2_questions"] = write_jsonl(out / "stage2_questions.jsonl", questions)

    # text: problems in the choice layout with their answers (base, replay), and SFT conversations
    def text_doc() -> str:
        return "\n\n".join("".join(answered(text_problem(rng, held_out=False))) for _ in range(4))

    counts["text"] = write_jsonl(out / "text.jsonl", ({"text": text_doc()} for _ in range(sizes.text_docs)))
    # the captions as plain text too: the base model learns the words it will later say about pictures
    counts["words"] = write_jsonl(out / "words.jsonl", ({"text": c["text"][len("<image>"):]} for c in caps))
    sft = []
    for _ in range(sizes.sft):
        rec = text_problem(rng, held_out=False)
        prompt, response = answered(rec)
        sft.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": response.strip()}], "source": "largest"})
    counts["sft"] = write_jsonl(out / "sft.jsonl", sft)
    return counts


def train_tokenizer(files: list[Path], out_dir: Path, vocab_size: int = 768) -> dict:
    """A byte-level BPE on the demo's text with the image and role tokens at fixed ids, digits split,
    and the Apriel-1.5 chat template: its system prompt and markers become merges, so a conversation
    costs tens of tokens, not hundreds."""
    def lines():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    r = json.loads(line)
                    yield r.get("text") or (r.get("prompt", "") + r.get("response", "")) or json.dumps(r)
        for _ in range(2000):  # as often as the conversations that use it
            yield APRIEL_15_CHAT_TEMPLATE

    def image_ids_fixed(fast):
        assert fast.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]) == [10, 12, 13]

    return save_bpe(lines(), out_dir, vocab_size, SPECIAL_TOKENS, MARKERS, APRIEL_15_CHAT_TEMPLATE, image_ids_fixed)
