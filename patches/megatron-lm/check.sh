#!/usr/bin/env bash
# Check that the BASE patch for a Megatron-LM tree applies cleanly, and optionally apply it.
#   patches/megatron-lm/check.sh /path/to/Megatron-LM          # dry run (git apply --check)
#   patches/megatron-lm/check.sh /path/to/Megatron-LM --apply  # apply it
# The patch is chosen by the tree's minor release (megatron/core/package_info.py; the tag core_v0.19.0
# says 0.19.1 there): core_v0.19.0-... for 0.19, core_v0.16.1-... for 0.16; any other tree is refused
# with the list of patches there are. Get a tree with e.g.
#   git clone --branch core_v0.19.0 --depth 1 https://github.com/NVIDIA/Megatron-LM
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tree="${1:?usage: $0 MEGATRON_LM_DIR [--apply]}"
info="$tree/megatron/core/package_info.py"
test -f "$info" -a -f "$tree/megatron/training/arguments.py" \
  || { echo "$tree does not look like a Megatron-LM checkout (no megatron/core/package_info.py, megatron/training/arguments.py)" >&2; exit 2; }
version="$(sed -n 's/^\(MAJOR\|MINOR\|PATCH\) = \([0-9]*\).*/\2/p' "$info" | paste -sd.)"
patch="$(ls "$here"/core_v"${version%.*}".*-base-router.patch 2>/dev/null | head -n 1 || true)"
if [[ -z "$patch" ]]; then
  echo "no BASE patch for Megatron-LM $version in $here; there are: $(cd "$here" && ls *.patch | tr '\n' ' ')" >&2
  exit 2
fi
cd "$tree"
git apply --check "$patch"
echo "OK: $(basename "$patch") applies cleanly to $tree (Megatron-LM $version)"
if [[ "${2:-}" == "--apply" ]]; then
  git apply "$patch"
  echo "applied"
fi
