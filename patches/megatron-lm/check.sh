#!/usr/bin/env bash
# Check that the BASE patch applies cleanly to a Megatron-LM tree, and optionally apply it.
#   patches/megatron-lm/check.sh /path/to/Megatron-LM          # dry run (git apply --check)
#   patches/megatron-lm/check.sh /path/to/Megatron-LM --apply  # apply it
# The patch is made against tag core_v0.16.1 (the release matching megatron-core 0.16.1):
#   git clone --branch core_v0.16.1 --depth 1 https://github.com/NVIDIA/Megatron-LM
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch="$here/core_v0.16.1-base-router.patch"
tree="${1:?usage: $0 MEGATRON_LM_DIR [--apply]}"
test -f "$tree/megatron/training/arguments.py" -a -f "$tree/gpt_builders.py" \
  || { echo "$tree does not look like a Megatron-LM checkout (no megatron/training/arguments.py, gpt_builders.py)" >&2; exit 2; }
cd "$tree"
git apply --check "$patch"
echo "OK: $(basename "$patch") applies cleanly to $tree"
if [[ "${2:-}" == "--apply" ]]; then
  git apply "$patch"
  echo "applied"
fi
