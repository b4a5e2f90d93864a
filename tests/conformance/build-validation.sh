#!/bin/bash
# Build the OCI runtime-tools validation programs (one TAP producer per validation/<name>/
# directory), their in-container helper `runtimetest` and the busybox rootfs tarball into a
# cache directory, and print that directory on stdout. Nothing is built inside the repository.
#
# usage: build-validation.sh [--source DIR|TARBALL] [--fixture] [--print-key]
#
# Where the runtime-tools source comes from, first match wins:
#   --source / $RUNTIME_TOOLS_SRC   an upstream checkout or tarball (with its vendor/ directory)
#   --fixture                       tests/conformance/fixture-suite (the harness's own suite)
#   $CACHE/runtime-tools/runtime-tools-<commit>.tar.gz   a tarball placed there once
# <commit> is the upstream commit Debian packages: it is read from the version of
# golang-github-opencontainers-runtime-tools-dev (0.9.0+git20220423.g0105384 -> 0105384).
#
# Exit status: 0 built (or already cached), 3 no source available, 1 build failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KATA_CACHE:-${HOME:-/root}/.cache/kata-agent-py}/runtime-tools
deb_pkg=golang-github-opencontainers-runtime-tools-dev
default_commit=0105384f68e16803891d0a17d9067b1def6a2778

log() { echo "build-validation: $*" >&2; }

source_arg=${RUNTIME_TOOLS_SRC:-}
fixture=0
print_key=0
while (($#)); do
    case $1 in
        --source) source_arg=${2:?--source needs a path}; shift 2 ;;
        --fixture) fixture=1; shift ;;
        --print-key) print_key=1; shift ;;
        *) log "unknown argument: $1"; exit 2 ;;
    esac
done

command -v go >/dev/null || { log "go toolchain missing (apt-get install golang-go)"; exit 3; }

deb_version=$(dpkg-query -W -f '${Version}' "$deb_pkg" 2>/dev/null || true)
commit=${RUNTIME_TOOLS_COMMIT:-}
if [[ -z $commit && $deb_version =~ \.g([0-9a-f]{7,40})(-|$) ]]; then
    commit=${BASH_REMATCH[1]}
fi
commit=${commit:-$default_commit}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9    # one build at a time per cache

# --- resolve the source -----------------------------------------------------------------
label=
src=
if ((fixture)); then
    src=$here/fixture-suite
    label=fixture
elif [[ -n $source_arg ]]; then
    src=$source_arg
    label=custom
else
    tarball=$(compgen -G "$cache/runtime-tools-$commit*.tar.gz" | head -n1 || true)
    if [[ -z $tarball ]]; then
        log "no runtime-tools source: Debian's $deb_pkg ${deb_version:-(not installed)} ships" \
            "only the library packages (no validation/, no cmd/runtimetest) and its source" \
            "package drops vendor/ (github.com/mndrix/tap-go is not packaged in Debian)."
        log "provide one of: RUNTIME_TOOLS_SRC=<checkout or tarball of commit $commit>," \
            "or $cache/runtime-tools-$commit.tar.gz"
        exit 3
    fi
    src=$tarball
    label=${deb_version:-$commit}
fi
[[ -e $src ]] || { log "source not found: $src"; exit 3; }
src=$(realpath "$src")

# The cache key covers the source content, the Go toolchain and this script.
if [[ -d $src ]]; then
    content=$(cd "$src" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'modules.txt' \) \
        -not -path './.git/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum)
else
    content=$(sha256sum <"$src")
fi
key=$(printf '%s\n' "$content" "$(go version)" "$(sha256sum <"$0")" "$(sha256sum <"$here/make-rootfs.sh")" \
    | sha256sum | cut -c1-12)
label=${label//[^A-Za-z0-9._+-]/_}
suite=$cache/$label-$key
if ((print_key)); then echo "$suite"; exit 0; fi
if [[ -f $suite/.complete ]]; then
    log "cached: $suite"
    echo "$suite"
    exit 0
fi

# --- unpack ------------------------------------------------------------------------------
work=$cache/work-$key
rm -rf "$work" "$suite"
mkdir -p "$work" "$suite/programs"
trap 'rm -rf "$work"' EXIT
if [[ -d $src ]]; then
    cp -a "$src/." "$work/src/" 2>/dev/null || { mkdir -p "$work/src" && cp -a "$src/." "$work/src/"; }
else
    mkdir -p "$work/src"
    tar -xf "$src" -C "$work/src"
    # GitHub archives wrap the tree in one top-level directory.
    mapfile -t top < <(find "$work/src" -mindepth 1 -maxdepth 1)
    if ((${#top[@]} == 1)) && [[ -d ${top[0]} ]]; then
        mv "${top[0]}" "$work/tree" && rm -rf "$work/src" && mv "$work/tree" "$work/src"
    fi
fi
tree=$work/src
[[ -d $tree/validation && -d $tree/cmd/runtimetest ]] || {
    log "$src has no validation/ and cmd/runtimetest/: not a runtime-tools source tree"; exit 3; }

# --- choose the build mode ----------------------------------------------------------------
export GOCACHE=${GOCACHE:-$cache/go-build}
export GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0
unset GOFLAGS
build_dir=$tree
if [[ -f $tree/vendor/modules.txt ]]; then
    export GO111MODULE=on GOFLAGS=-mod=vendor
    mode="module, vendored dependencies"
elif [[ -f $tree/go.mod ]] && ! grep -q '^require' "$tree/go.mod"; then
    export GO111MODULE=on GOFLAGS=-mod=mod
    mode="module, no dependencies"
else
    # No vendor/: resolve imports from Debian's Go packages in GOPATH mode.
    modpath=$(awk '/^module /{print $2; exit}' "$tree/go.mod" 2>/dev/null || true)
    modpath=${modpath:-github.com/opencontainers/runtime-tools}
    mkdir -p "$work/gopath/src/$(dirname "$modpath")"
    mv "$tree" "$work/gopath/src/$modpath"
    build_dir=$work/gopath/src/$modpath
    export GO111MODULE=off GOPATH=$work/gopath:/usr/share/gocode
    mode="GOPATH, Debian packages under /usr/share/gocode"
fi
log "building $src into $suite ($mode)"

cd "$build_dir"
go build -trimpath -tags "netgo osusergo" -o "$suite/runtimetest" ./cmd/runtimetest

failures=$suite/build-failures.txt
: >"$failures"
mapfile -t programs < <(for d in validation/*/; do
    name=$(basename "$d")
    [[ $name == util ]] && continue
    grep -lq '^package main' "$d"*.go 2>/dev/null && echo "$name"
done)
((${#programs[@]})) || { log "no validation programs found"; exit 1; }
# One go build for all programs is much faster than one per program; fall back to one per
# program only when something fails, so a single broken program is recorded, not fatal.
if ! go build -trimpath -o "$suite/programs/" "${programs[@]/#/./validation/}" 2>"$work/build.log"; then
    for name in "${programs[@]}"; do
        [[ -x $suite/programs/$name ]] && continue
        if ! go build -trimpath -o "$suite/programs/$name" "./validation/$name" 2>"$work/$name.log"; then
            printf '%s\t%s\n' "$name" "$(grep -m1 -v '^#' "$work/$name.log" | tr '\t' ' ')" >>"$failures"
        fi
    done
fi

goarch=$(go env GOARCH)
"$here/make-rootfs.sh" "$suite/rootfs-$goarch.tar.gz"

{
    echo "source=$src"
    echo "label=$label"
    echo "commit=$commit"
    echo "debian_package_version=${deb_version:-none}"
    echo "go=$(go version)"
    echo "mode=$mode"
    echo "programs=${#programs[@]}"
    echo "build_failures=$(wc -l <"$failures")"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$suite/BUILD-INFO"
touch "$suite/.complete"
log "built ${#programs[@]} programs ($(wc -l <"$failures") failed to build) in $suite"
echo "$suite"
