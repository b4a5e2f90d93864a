#!/bin/bash
# Build (or reuse) the OCI runtime-tools validation suite and run it against RUNTIME.
#
# usage: run-validation.sh [options] RUNTIME [PROGRAM...]
#   RUNTIME      runc, kata-oci, or a path to a runc-compatible executable
#   --fixture    run the harness's own two-program suite instead of runtime-tools
#   --json FILE  results document (default: $KATA_CACHE/runtime-tools/results/<runtime>.json)
#   --timeout S  seconds per program (default 60)     --budget S  seconds in total (default 600)
#   --require F  exit 1 unless every program listed in F fully passes
#   --compare F  print what a baseline results file passes that this run does not
# Environment: KATA_CACHE, RUNTIME_TOOLS_SRC (see build-validation.sh).
# Exit status: 0 ran (and the --require list passed), 1 a required program failed,
# 3 the suite cannot be built here (no source or no Go toolchain).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${KATA_CACHE:-${HOME:-/root}/.cache/kata-agent-py}/runtime-tools

build_args=()
run_args=()
json=
while (($#)); do
    case $1 in
        --fixture) build_args+=(--fixture); shift ;;
        --json) json=$2; shift 2 ;;
        --timeout|--budget|--require|--compare|--state-root) run_args+=("$1" "$2"); shift 2 ;;
        --) shift; break ;;
        -*) echo "run-validation: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
runtime=${1:?usage: run-validation.sh [options] RUNTIME [PROGRAM...]}
shift

if [[ $runtime == kata-oci ]] && ! command -v kata-oci >/dev/null; then
    runtime=$here/kata-oci
fi
[[ $runtime == */* ]] && runtime=$(realpath "$runtime")
name=$(basename "$runtime")
json=${json:-$cache/results/$name.json}

python=$repo/.venv/bin/python
[[ -x $python ]] || python=python3

rc=0
suite=$("$here/build-validation.sh" "${build_args[@]}") || rc=$?
if ((rc)); then
    echo "run-validation: the validation suite could not be built (status $rc)" >&2
    exit "$rc"
fi
exec "$python" "$here/run_validation.py" --suite "$suite" --runtime "$runtime" --json "$json" \
    --log-dir "${json%.json}-logs" "${run_args[@]}" "$@"
