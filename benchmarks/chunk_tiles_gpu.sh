#!/bin/bash
# One device call: the chunk GPU tests (and optionally the kernel profile) under candidate tile sets of
# rebased/ops/triton/chunk_states.py. Each argument is one set, "name=features:warps[:sel|:3d] ...", replacing
# those TILE_CONFIGS entries (the form, selector dots or 3D tiles, as committed where left out). The device's
# copy of the module is rewritten for each set and restored after, so the tests run the code exactly as a
# user would import it; "" is the committed set.
#   bash benchmarks/chunk_tiles_gpu.sh "" "sums=128:8:3d"
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
sys.path.insert(0, ".")
from rebased.ops.triton.chunk_states import TILE_CONFIGS, GroupTiles  # noqa: E402

path, spec = sys.argv[1], sys.argv[2]
text = open(path).read()
for name, config in GroupTiles.parse_set(spec, TILE_CONFIGS).items():
    line = f'"{name}": GroupTiles({config.features}, {config.warps}, selectors={config.selectors}),'
    text, count = re.subn(rf'"{name}": GroupTiles\([^)]*\),', line, text)
    assert count == 1, f"TILE_CONFIGS entry {name} not found"
open(path, "w").write(text)
print("set:", spec or "(committed)")
print("\n".join(line for line in text.splitlines() if "GroupTiles(" in line and line.startswith("    \"")))
EOF
    timeout "${TEST_S:-170}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -k chunk 2>&1 | tee -a "$log" | tail -3
    if [ -n "$PROFILE" ] && grep -q " passed" "$log" && ! grep -q "failed" "$log"; then
        timeout "${PROFILE_S:-90}" python3 benchmarks/chunk_states_profile_gpu.py --no-layer-norm --cases 256:4096 \
            2>&1 | tee -a "$log" | grep "GPU time"
    fi
done
cp /tmp/chunk_states.py.orig "$module"
