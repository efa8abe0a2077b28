"""The training config: one dataclass tree for every stage (upscale-training, CPT, SFT).

Loaded with :func:`megatron_apriel.config.load_config` from ``examples/<model>/<stage>.yaml`` plus
dotted overrides; printed in full at start and saved beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_apriel.config import ConfigError
from megatron_apriel.data.blends import BlendSpec, blend_spec, stage_checkpoint
from megatron_apriel.data.registry import check_dataset_name
from megatron_apriel.models import float8, torch_fusions
from megatron_apriel.training.fault import FaultConfig, check_nan_policy
from megatron_apriel.training.optimizer import OptimConfig

FREEZE_GROUPS = ("embeddings", "decoder", "output_layer", "vision_encoder", "projector")


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # a name of models.presets.PRESETS; required (the run plan says so)
    changes: dict[str, Any] = field(default_factory=dict)  # preset fields replaced (num_layers: 5)
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    # none | torchao-tensorwise | torchao-rowwise (the local spec's linears in float8 through torchao,
    # models/float8.py; CUDA capability >= 8.9, emulated on the CPU backend) | te-hybrid | te-e4m3
    # (Transformer Engine on a GPU; earlier configs' hybrid / e4m3 mean these)
    fp8: Any = None
    fp8_recipe: str = "delayed"  # TE only: delayed | tensorwise | mxfp8 | blockwise
    # torchao recipes: keep the linears of the first / last N decoder layers in bf16 (as Megatron-LM's
    # --first-last-layers-bf16); their outputs feed the embedding and the output layer
    fp8_bf16_first_layers: int = 0
    fp8_bf16_last_layers: int = 0
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1
    use_te: Optional[bool] = None  # None: TE when on CUDA and importable
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Bitwise-reproducible kernels (torch.use_deterministic_algorithms, megatron-core's
    # deterministic_mode): on a GPU, attention backward and some reductions otherwise use atomics, so
    # two runs of the same steps differ in the last bits. Slower; for checks, not production runs.
    deterministic: bool = False
    # torch-native stand-ins, on CUDA without apex/TE, for the fused kernels megatron-core would take
    # from them (models/torch_fusions.py): "default" (wgrad,adam,gradnorm), "none", or a list of
    # wgrad, adam, gradnorm, rope, layer (each decoder layer under torch.compile). Same math; measured
    # by benchmarks/train_throughput.py --fusions.
    torch_fusions: Any = "default"

    def validate(self):
        try:
            torch_fusions.parse(self.torch_fusions)
        except ValueError as e:
            raise ConfigError(f"model.torch_fusions: {e}") from None
        try:
            float8.normalize(self.fp8)
        except ValueError as e:
            raise ConfigError(f"model.fp8: {e}") from None
        for key in ("fp8_bf16_first_layers", "fp8_bf16_last_layers"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"model.{key}: must be a whole number >= 0, got {getattr(self, key)!r}")


@dataclass
class DataConfig:
    """Where the samples come from.

    ``kind: blend``: ``blend`` is a :class:`megatron_apriel.data.blends.BlendSpec` (loss on every
    token; ``seq_length`` and ``steps`` default to the ``train`` section's). ``kind: dataset``:
    ``factory`` (a name of :data:`megatron_apriel.data.registry.DATASETS`, e.g. ``sft``, or
    ``module:callable`` for a dataset of one's own) is called with
    ``factory_args`` plus ``seq_length`` and returns a torch Dataset (or ``(train, valid)``) of
    loss-masked GPTDataset-like items, optionally packed with ``cu_seqlens`` (SFT, CPT stage 2);
    ``valid_factory_args`` builds the validation set the same way.
    """

    kind: Literal["blend", "dataset"] = "blend"
    blend: Any = field(default_factory=dict)  # a BlendSpec mapping, or the path of its YAML
    factory: Optional[str] = None
    factory_args: dict[str, Any] = field(default_factory=dict)
    valid_factory_args: dict[str, Any] = field(default_factory=dict)
    # Named validation sets, each logged apart as valid/<name>/loss at logging.eval_interval, so
    # forgetting on replay data shows apart from gains on reasoning data. valid_sets (kind dataset):
    # name -> factory args; valid_per_source (kind blend): one set per blend source, from its
    # held-out documents (the blend's split).
    valid_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    valid_per_source: bool = False
    eod_token: int = 2
    num_workers: int = 0

    def validate(self):
        if self.kind == "dataset" and not self.factory:
            raise ConfigError("data.factory: needed when data.kind is dataset (a registered name or module:callable)")
        if self.kind == "dataset":
            check_dataset_name(self.factory)
        if self.valid_sets and self.kind != "dataset":
            raise ConfigError("data.valid_sets: factory args per name, for data.kind dataset "
                              "(for a blend use data.valid_per_source)")
        if self.valid_per_source and self.kind != "blend":
            raise ConfigError("data.valid_per_source: needs data.kind blend")
        for name, args in self.valid_sets.items():
            if not isinstance(args, dict):
                raise ConfigError(f"data.valid_sets.{name}: factory args (a mapping), got {type(args).__name__}")


@dataclass
class ScheduleConfig:
    warmup_iters: int = 0
    decay_style: Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"] = "cosine"
    decay_iters: Optional[int] = None  # default: train_iters
    wsd_decay_iters: Optional[int] = None
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    init_lr: float = 0.0


@dataclass
class TrainSection:
    seq_length: int = 128
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    seed: int = 1234
    freeze: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    exit_interval: Optional[int] = None  # checkpoint and exit (code 3) after this many iterations
    # NaN/Inf in the loss or gradients: stop (exit 1, nothing saved, the step named) or skip the
    # update (logged), at most nan_skip_limit times in a run, then stop
    nan_policy: str = "stop"
    nan_skip_limit: int = 10

    def validate(self):
        check_nan_policy(self.nan_policy, self.nan_skip_limit)
        bad = [g for g in self.freeze if g not in FREEZE_GROUPS]
        if bad:
            raise ConfigError(f"train.freeze: unknown group {bad[0]!r} (known: {', '.join(FREEZE_GROUPS)})")


@dataclass
class CheckpointConfig:
    """Starting point and saving.

    A ``save`` folder holding a complete checkpoint is always resumed in full (optimizer,
    scheduler, RNG, data position), so a requeued job continues where it stopped. Otherwise the run
    starts from ``load`` (or the blend stage's ``load``): ``weights`` (also ``auto``) loads the
    model only, at any TP/PP; ``full`` continues that run's whole state, at the same TP/PP, or at
    any TP/PP when it was saved with ``optimizer_format: fully_reshardable``.
    """

    save: Optional[str] = None
    load: Optional[str] = None  # save root with a marker, or one iter_* / dist checkpoint folder
    load_mode: Literal["auto", "full", "weights"] = "auto"
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None  # None keeps all
    keep_every: Optional[int] = None  # also keep every iteration divisible by this
    async_save: bool = False
    # dp_reshardable: Megatron-LM's default, a full resume needs the same TP/PP;
    # fully_reshardable: the optimizer state is saved in model space, resumable at any TP/PP/DP
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    log_dir: Optional[str] = None  # TensorBoard + metrics.jsonl; default <save>/logs
    peak_tflops: Optional[float] = None  # per GPU, for MFU; default: the GPU's dense bf16 peak (models.flops)
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


def blend_spec_of(cfg: TrainConfig) -> BlendSpec:
    """The blend a training config's data section names, at the config's sequence length and steps."""
    return blend_spec(cfg.data.blend, cfg.train.seq_length, cfg.train.train_iters)


def stage_load(cfg: TrainConfig) -> Optional[str]:
    """The starting checkpoint a blend stage names (``stages[].load``), when checkpoint.load is unset."""
    if cfg.data.kind != "blend":
        return None
    return stage_checkpoint(blend_spec_of(cfg))
