#!/usr/bin/env bash
# The CPU study (issue 18) in the background: two one-thread processes on disjoint runs, one a core,
# at the lowest priority (nice, and their autogroup's nice: sessions otherwise share the CPU equally),
# so that tests and editing still get a core. Both resume where the study stands; what both need
# (the reference's kept answers, a degraded model's evaluations, the synthetic pool) is made once,
# under a lock. Run it from a worktree of a committed version (the code the runs use), e.g.
#
#   git worktree add -f --detach /work/study HEAD        # or: git -C /work/study checkout --detach HEAD
#   CONFIG=/work/main/study-cpu.yaml PY=/work/main/.venv/bin/python /work/study/tools/study_cpu.sh
#   tail -f /work/main/runs/study-cpu-a.log              # and -b.log; kill "$(cat runs/study-cpu-a.pid)" to stop
#
# A: SmolLM2 noise-all, noise-kv and the data sweep, then Gemma-3 and Qwen on their first damages;
# B: SmolLM2 rtn3-mlp and gguf-q4_0, then the other Gemma-3 / Qwen damages, then the MHA twin.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-$HERE/study-cpu.yaml}"
PY="${PY:-$HERE/.venv/bin/python}"
RUNS="$(dirname "$CONFIG")/runs"
A="${A:-smollm2/noise-all smollm2/noise-kv gemma3-270m/noise-all gemma3-270m/rtn3-mlp qwen2.5-coder-0.5b/noise-all}"
B="${B:-smollm2/rtn3-mlp smollm2/gguf-q4_0 gemma3-270m/gguf-q4_0 qwen2.5-coder-0.5b/rtn3-mlp smollm2-mha}"
mkdir -p "$RUNS"

start() {
    local name=$1; shift
    if [ -f "$RUNS/study-cpu-$name.pid" ] && kill -0 "$(cat "$RUNS/study-cpu-$name.pid")" 2>/dev/null; then
        echo "study process $name is running already (pid $(cat "$RUNS/study-cpu-$name.pid"))"; return
    fi
    # a simple command in the background, so that $! is the study process itself (nohup and nice exec it)
    (cd "$HERE" || exit 1
     OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$HERE/src" nohup nice -n 15 "$PY" -m recover_lora.cli \
         study --config "$CONFIG" --only "$@" >> "$RUNS/study-cpu-$name.log" 2>&1 &
     echo $! > "$RUNS/study-cpu-$name.pid")
    echo 19 > "/proc/$(cat "$RUNS/study-cpu-$name.pid")/autogroup" 2>/dev/null || true
    echo "study process $name: pid $(cat "$RUNS/study-cpu-$name.pid"), log $RUNS/study-cpu-$name.log"
}

# shellcheck disable=SC2086  # the selections are word lists on purpose
start a $A
sleep 20  # the first makes the shared pieces first; the second then waits on their locks
# shellcheck disable=SC2086
start b $B
