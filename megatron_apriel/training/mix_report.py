"""``apriel mix-report SPEC``: what a blend will draw from each source before a run spends GPUs on it.

``SPEC`` is a blend file of its own (keys in errors named from its top level) or a training config,
read as ``apriel train`` reads it: its run plan parses ``data.blend`` (the spec training draws from,
at the config's sequence length and steps), and a config whose data is the registered
``image-text-blend`` factory (however the config names it) is read through its ``factory_args`` as
that dataset reads them. The report itself is :mod:`megatron_apriel.data.mix_report`'s; this verb sits
in the training layer because the run plan does.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from megatron_apriel.config import ConfigError, apply_overrides, atomic_write_text, load_config, load_yaml
from megatron_apriel.data.blends import BlendSpec, blend_spec
from megatron_apriel.data.image_text_blend import KEY as IMAGE_TEXT_KEY
from megatron_apriel.data.image_text_blend import ImageTextBlend
from megatron_apriel.data.mix_report import format_report, mix_report, write_png
from megatron_apriel.data.registry import resolve_dataset
from megatron_apriel.errors import cli_main
from megatron_apriel.outputs import ArgumentParser, check_output_file, positive_int
from megatron_apriel.training.config import TrainConfig
from megatron_apriel.training.plan import make_plan


def load_spec(path: str, overrides=()) -> tuple[BlendSpec, int | None, str]:
    """A bare blend spec, or the blend of a training config.

    Returns the spec, the training config's global batch size (None for a bare spec) and the key
    that names the spec in errors of the report.
    """
    raw = load_yaml(path)
    if "sources" in raw or not isinstance(raw.get("data"), dict):
        try:
            return blend_spec(apply_overrides(raw, overrides), None, key=""), None, ""
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    cfg = load_config(TrainConfig, path, overrides)
    if cfg.data.kind == "dataset" and resolve_dataset(str(cfg.data.factory)) is ImageTextBlend:
        return _image_text_spec(path, cfg)
    try:  # the layout checks at the fewest GPUs that hold the model; data read by the report itself
        plan = make_plan(cfg, files=False, device="cpu")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if plan.blend is None:
        raise ConfigError(f"{path}: data.kind: {cfg.data.kind} with data.factory {cfg.data.factory}: "
                          "no blend to report (give data.kind: blend or the image-text-blend factory)")
    return plan.blend, cfg.train.global_batch_size, "data.blend"


def _image_text_spec(path: str, cfg: TrainConfig) -> tuple[BlendSpec, int | None, str]:
    """The spec of a training config whose data is the image-text blend: its ``factory_args``, as
    training passes them (``blend`` a mapping or a YAML path, ``seq_length`` = train.seq_length)."""
    args, seq = cfg.data.factory_args, cfg.train.seq_length
    blend = args.get("blend")
    if isinstance(blend, str):  # keys are then named from the blend file's top level
        if not os.path.isfile(blend):
            raise ConfigError(f"{path}: {IMAGE_TEXT_KEY}: {blend}: no such file")
        section, key, where = load_yaml(blend), "", f"{blend}: "
    elif isinstance(blend, dict):
        section, key, where = dict(blend), IMAGE_TEXT_KEY, f"{path}: "
    else:
        raise ConfigError(f"{path}: {IMAGE_TEXT_KEY}: give the blend spec (a mapping or a YAML path)")
    if section.get("seq_length", seq) != seq:
        at = f"{key}." if key else ""
        raise ConfigError(f"{where}{at}seq_length: {section['seq_length']} != train.seq_length {seq} of {path}")
    try:
        spec = blend_spec(section, seq, key=key)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return spec, args.get("global_batch_size") or cfg.train.global_batch_size, key


@cli_main()
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="apriel mix-report", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="blend spec YAML, or a training config with a data: section")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seed=7 (data.seed=7 for a training config)")
    ap.add_argument("--stage", default=None, help="stage of a staged curriculum (default: the spec's)")
    ap.add_argument("--global-batch-size", type=positive_int, default=None,
                    help="rounds a token budget up to whole steps (default: the training config's, or 1)")
    ap.add_argument("--first", type=positive_int, default=1000, help="samples of the early-share column")
    ap.add_argument("--png", default=None, help="bar chart path (default: SPEC with .mix.png)")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    png = args.png or os.path.splitext(args.spec)[0] + ".mix.png"
    check_output_file(png, "--png" if args.png else "--png (default: beside the spec)")
    if args.json:
        check_output_file(args.json, "--json")
    spec, config_gbs, key = load_spec(args.spec, args.overrides)
    gbs = args.global_batch_size or config_gbs or 1
    try:  # the data the spec names (prefixes missing or truncated): keys as the spec names them
        report = mix_report(spec, gbs, args.first, args.stage, key=key)
    except ConfigError as e:
        raise ConfigError(f"{args.spec}: {e}") from None
    print(format_report(report))
    write_png(report, png)
    print(f"wrote {png}")
    if args.json:
        atomic_write_text(args.json, json.dumps(asdict(report), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
