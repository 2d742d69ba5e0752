#!/bin/bash
# One device call: the chunk GPU tests (and optionally the kernel profile) under candidate tile sets of
# rebased/ops/triton/chunk_states.py. Each argument is one set, "[SEL] name=features:warps ...": SEL turns
# SELECTOR_FEATURES on, the pairs replace TILE_CONFIGS entries. The device's copy of the module is rewritten
# for each set and restored after, so the tests run the code exactly as a user would import it.
#   bash benchmarks/chunk_tiles_gpu.sh "SEL" "SEL sums=256:8 output=256:8 dkdv=64:4 dq=64:4"
#   PROFILE=1 ...   also profile each set whose tests pass (benchmarks/chunk_states_profile_gpu.py, T 4096)
# Logs: $OUT/tiles_<n>.log, one per set, in argument order.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
module=rebased/ops/triton/chunk_states.py
cp "$module" /tmp/chunk_states.py.orig
n=0
for spec in "$@"; do
    n=$((n + 1))
    log="$OUT/tiles_$n.log"
    cp /tmp/chunk_states.py.orig "$module"
    python3 - "$module" "$spec" <<'EOF' | tee "$log"
import re, sys
path, spec = sys.argv[1], sys.argv[2].split()
text = open(path).read()
if "SEL" in spec:
    text, count = re.subn(r"^SELECTOR_FEATURES = False$", "SELECTOR_FEATURES = True", text, flags=re.M)
    assert count == 1, "SELECTOR_FEATURES line not found"
for item in (s for s in spec if "=" in s):
    name, value = item.split("=")
    features, warps = value.split(":")
    text, count = re.subn(rf'"{name}": \(\d+, \d+\)', f'"{name}": ({int(features)}, {int(warps)})', text)
    assert count == 1, f"TILE_CONFIGS entry {name} not found"
open(path, "w").write(text)
print("set:", " ".join(spec) or "(committed)")
print([line for line in text.splitlines() if line.startswith(("TILE_CONFIGS =", "SELECTOR_FEATURES ="))])
EOF
    timeout "${TEST_S:-170}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -k chunk 2>&1 | tee -a "$log" | tail -3
    if [ -n "$PROFILE" ] && grep -q " passed" "$log" && ! grep -q "failed" "$log"; then
        timeout "${PROFILE_S:-90}" python3 benchmarks/chunk_states_profile_gpu.py --no-layer-norm --cases 256:4096 \
            2>&1 | tee -a "$log" | grep "GPU time"
    fi
done
cp /tmp/chunk_states.py.orig "$module"
