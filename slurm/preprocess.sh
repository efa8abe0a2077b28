#!/bin/bash
# Tokenize a corpus too big for one node: one SLURM array task per input file, then one merge job.
#   slurm/preprocess.sh INPUT OUTPUT_PREFIX [tools/preprocess_data.py flags ...]
#   slurm/preprocess.sh 'raw/reasoning/*.jsonl.zst' data/cpt/reasoning --tokenizer-type TikTokenizer \
#       --tokenizer-model nemo --append-eod
# Run it with bash on the login node (not sbatch): it lists the input files exactly as one
# `tools/preprocess_data.py --input INPUT` run would (a file, a glob, a folder; sorted), writes the
# list to OUTPUT_PREFIX.shards/inputs.txt, submits this script as an array job (task i runs
# tools/preprocess_data.py on file i into OUTPUT_PREFIX.shards/NNNNN) and a merge job that starts
# when every task succeeded (afterok). The merge joins the shards of each key in file order with
# tools/merge_datasets.py into OUTPUT_PREFIX_<key>_document.bin/.idx, the bytes one process writes,
# sums the shards' OUTPUT_PREFIX.stats.json (documents, tokens, skipped records per reason) and then
# removes the shards. SBATCH_ARGS adds sbatch flags to both jobs (--partition, --account ...).
# `mkdir -p logs` first.
#SBATCH --job-name=apriel-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%A_%a.out

# sbatch runs a spooled copy of this file: find the checkout from the job's Command instead of $0.
if [ -z "${APRIEL_HOME:-}" ]; then
  _script=$0
  [ -n "${SLURM_JOB_ID:-}" ] && _script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  APRIEL_HOME=$(cd "$(dirname "$_script")/.." && pwd)
fi
source "$APRIEL_HOME/slurm/common.sh"
export APRIEL_HOME PYTHONPATH="$APRIEL_HOME${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

if [ $# -lt 2 ]; then
  echo "usage: slurm/preprocess.sh INPUT OUTPUT_PREFIX [tools/preprocess_data.py flags ...]" >&2
  exit 2
fi
input=$1 prefix=$2
shift 2
shards="$prefix.shards"

case "${APRIEL_PREPROCESS_STAGE:-submit}" in
submit)
  mkdir -p "$shards" logs
  "$PYTHON" - "$input" "$shards/inputs.txt" <<'EOF' || exit 2
import sys
from megatron_apriel.data.preprocess import PreprocessError, expand_inputs
try:
    files = expand_inputs(sys.argv[1])
except PreprocessError as e:
    sys.exit(f"slurm/preprocess.sh: error: {e}")
open(sys.argv[2], "w").write("".join(f"{p}\n" for p in files))
EOF
  n=$(wc -l < "$shards/inputs.txt")
  script="$APRIEL_HOME/slurm/preprocess.sh"
  # shellcheck disable=SC2086
  array=$(sbatch --parsable ${SBATCH_ARGS:-} --array="0-$((n - 1))" --export="ALL,APRIEL_PREPROCESS_STAGE=shard" \
          "$script" "$input" "$prefix" "$@")
  # shellcheck disable=SC2086
  merge=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=apriel-preprocess-merge --cpus-per-task=2 \
          --dependency="afterok:${array%%;*}" --export="ALL,APRIEL_PREPROCESS_STAGE=merge" \
          --output="logs/%x-%j.out" "$script" "$input" "$prefix" "$@")
  apriel_log "$n input files: array job ${array%%;*} (one task each), merge job ${merge%%;*} -> ${prefix}_<key>_document"
  echo "${array%%;*} ${merge%%;*}"
  ;;
shard)
  i=${SLURM_ARRAY_TASK_ID:?the shard stage runs as an array task}
  file=$(sed -n "$((i + 1))p" "$shards/inputs.txt")
  apriel_log "shard $i: $file"
  exec "$PYTHON" "$APRIEL_HOME/tools/preprocess_data.py" --input "$file" --output-prefix "$(printf '%s/%05d' "$shards" "$i")" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
  ;;
merge)
  "$PYTHON" - "$shards" "$prefix" "$input" <<'EOF'
import collections, json, shutil, sys
from pathlib import Path
from megatron_apriel.config import atomic_write_text
from megatron_apriel.data.merge import merge

shards, prefix = Path(sys.argv[1]), sys.argv[2]
n = len((shards / "inputs.txt").read_text().splitlines())
stats = [json.loads((shards / f"{i:05d}.stats.json").read_text()) for i in range(n)]
keys = list(stats[0]["tokens_per_key"])
for key in keys:
    docs, tokens = merge([str(shards / f"{i:05d}_{key}_document") for i in range(n)], f"{prefix}_{key}_document")
    print(f"[preprocess merge] {key}: {n} shards, {docs:,} documents, {tokens:,} tokens -> {prefix}_{key}_document", flush=True)
total = {"input": sys.argv[3], "output_prefix": prefix, "tokenizer": stats[0].get("tokenizer"), "shards": n}
for field in ("records", "documents", "tokens", "skipped", "input_bytes"):
    total[field] = sum(s[field] for s in stats)
total["tokens_per_key"] = {k: sum(s["tokens_per_key"][k] for s in stats) for k in keys}
total["skipped_by_reason"] = dict(sorted(sum((collections.Counter(s["skipped_by_reason"]) for s in stats), collections.Counter()).items()))
atomic_write_text(Path(prefix + ".stats.json"), json.dumps(total, indent=2) + "\n")
print(f"[preprocess merge] {total['documents']:,} documents, {total['tokens']:,} tokens, skipped {total['skipped']:,} "
      f"({', '.join(f'{k} {v}' for k, v in total['skipped_by_reason'].items()) or 'none'}) from {n} shards", flush=True)
shutil.rmtree(shards)
EOF
  ;;
*)
  echo "slurm/preprocess.sh: unknown APRIEL_PREPROCESS_STAGE=${APRIEL_PREPROCESS_STAGE}" >&2
  exit 2
  ;;
esac
