#!/usr/bin/env bash
# Run the Megatron tests against other megatron-core releases, one install folder per release.
#
#   scripts/test_megatron_versions.sh 0.16.1 0.17.1 0.18.2      # after the README's test command made .venv/
#
# Each release is installed with `pip install --no-deps --ignore-requires-python --target` into its own
# folder under $MEGATRON_VERSIONS_DIR (default /tmp/base-plugin-megatron-versions, outside the checkout),
# which is put in front of .venv's packages for that run only; everything else (torch, DeepSpeed, scipy,
# base-plugin itself) is .venv's. megatron-core 0.17+ declare Requires-Python >= 3.12 but ship cp311
# wheels that work on 3.11, and 0.18+ import triton without declaring it, so triton goes into a shared
# folder for those. The tests: tests/test_megatron_*.py and tests/test_optim_megatron.py (Megatron's DDP
# with SLAMB). Prints one summary line per release and exits non-zero if any release failed.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -gt 0 ]] || { echo "usage: $0 MEGATRON_CORE_VERSION..." >&2; exit 2; }
py=.venv/bin/python
[[ -x $py ]] || { echo "no .venv: run the README's test command first" >&2; exit 2; }
root="${MEGATRON_VERSIONS_DIR:-/tmp/base-plugin-megatron-versions}"
mkdir -p "$root"
summary=()
status=0
for version in "$@"; do
    dir="$root/megatron-core-$version"
    if [[ ! -d $dir/megatron/core ]]; then
        $py -m pip install -q --no-deps --ignore-requires-python --target "$dir" "megatron-core==$version" || exit 1
    fi
    path="$dir"
    if [[ "$(printf '%s\n' 0.18.0 "$version" | sort -V | head -n1)" == 0.18.0 ]]; then
        [[ -d $root/triton/triton ]] || $py -m pip install -q --no-deps --target "$root/triton" "triton<4" || exit 1
        path="$dir:$root/triton"
    fi
    got="$(PYTHONPATH="$path" $py -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null)"
    [[ $got == "$version" ]] || { echo "megatron-core $version: imported $got instead" >&2; exit 1; }
    log="$root/pytest-$version.log"
    echo "== megatron-core $version (log: $log)"
    PYTHONPATH="$path" $py -m pytest -q -p no:cacheprovider tests/test_megatron_*.py tests/test_optim_megatron.py \
        > "$log" 2>&1
    rc=$?
    line="$(grep -E '[0-9]+ (passed|failed)' "$log" | tail -n1)"
    echo "$line"
    summary+=("megatron-core $version: $line (exit $rc)")
    [[ $rc == 0 ]] || status=1
done
printf '%s\n' "${summary[@]}"
exit $status
