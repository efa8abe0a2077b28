"""The throughput tables of docs/performance.md, made from the raw records in benchmarks/results/.

    python benchmarks/perf_report.py                      # print the tables of every record
    python benchmarks/perf_report.py --update docs/performance.md

Each record is what ``benchmarks/train_throughput.py --results`` wrote: the environment, the exact
command and every row's step times. A table is printed per record (device, stack versions and the
command above it), so a figure in the docs can always be traced to its raw output. ``--update``
replaces the text between the ``<!-- results:begin -->`` and ``<!-- results:end -->`` markers of
the given file and leaves the rest alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['path']} | {r['recompute']} | {r.get('fusions', '-')} | unavailable: {r['error']} | | | | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    mem = f"{r['peak_mem_GiB']:.1f}" if r.get("peak_mem_GiB") is not None else "-"
    return (f"| {r['path']} | {r['recompute']} | {r.get('fusions', '-')} | {r['layers']} | {r['seq']} "
            f"| {r['micro_batch']} x {r['grad_accum']} "
            f"| {r['step_time_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {mfu} "
            f"| {mem} |")


def record_table(record: dict, name: str) -> str:
    env = record["environment"]
    device = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    stack = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "cudnn", "megatron-core", "transformer-engine")
                      if env.get(k) is not None)
    lines = [
        f"### {device}, {record['utc']}",
        "",
        f"Raw record: `benchmarks/results/{name}` (driver {env.get('driver') or '-'}; {stack}; "
        f"commit {(env.get('commit') or '-')[:12]}{' + local changes' if env.get('dirty') else ''}).",
        "",
        "```",
        record["command"],
        "```",
        "",
        "| path | recompute | torch fusions | layers | seq | micro-batch x accum | step s (median) | tokens/s/GPU "
        "| TFLOP/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in record["rows"]),
    ]
    for r in record["rows"]:
        prof = r.get("profile")
        if not prof:
            continue
        if prof.get("device") == "cuda" and not all("scopes" in t for t in prof.get("top_ops", [])):
            # the first CUDA summaries summed each op's self device time, which counted CUPTI's own
            # records ("Command Buffer Full") as GPU time; their step times are unaffected
            lines += ["", f"(Profile of {r['path']} fusions={r.get('fusions', '-')} not shown: recorded by the "
                      "summary that counted CUPTI's records as GPU time.)"]
            continue
        lines += ["", f"Time by op class, {r['path']} recompute={r['recompute']} fusions={r.get('fusions', '-')} "
                  f"micro-batch {r['micro_batch']} x {r['grad_accum']} ({prof['steps']} profiled steps):", "",
                  "| op class | ms/step | share of step |", "|---|---|---|"]
        for cls, ms in sorted(prof["classes_ms_per_step"].items(), key=lambda kv: -kv[1]):
            if ms > 0:
                lines.append(f"| {cls} | {ms:.2f} | {100 * ms / prof['step_ms']:.1f}% |")
    return "\n".join(lines)


def load_records(paths: list[str]) -> list[tuple[str, dict]]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(p.glob("train_throughput-*.json")) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"perf_report: {f}: not a readable results record ({e})")
        if not isinstance(rec, dict) or "rows" not in rec or "environment" not in rec:
            raise SystemExit(f"perf_report: {f}: not a train_throughput results record (no 'rows'/'environment')")
        out.append((f.name, rec))
    return sorted(out, key=lambda nr: nr[1]["utc"])


def render(records: list[tuple[str, dict]]) -> str:
    if not records:
        return "No raw records yet: run `python benchmarks/train_throughput.py --results` on a GPU."
    return "\n\n".join(record_table(rec, name) for name, rec in records)


def update(doc: Path, text: str) -> None:
    old = doc.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"perf_report: {doc} has no {BEGIN} ... {END} markers")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    os.replace(tmp, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="*", default=[str(HERE / "results")],
                    help="result files or folders (default: benchmarks/results/)")
    ap.add_argument("--update", default=None, help="rewrite the marked section of this Markdown file")
    args = ap.parse_args(argv)
    text = render(load_records(args.records))
    if args.update:
        update(Path(args.update), text)
        print(f"updated {args.update}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
