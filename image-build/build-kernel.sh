#!/usr/bin/env bash
# Build the guest kernel for one architecture from config fragments, with a content-addressed cache.
#
# usage: image-build/build-kernel.sh x86_64|aarch64
# env:   KERNEL_SRC      an unpacked kernel tree (default: unpack KERNEL_TARBALL into the cache)
#        KERNEL_TARBALL  default /usr/src/linux-source-6.1.tar.xz (Debian linux-source-6.1)
#        KATA_CACHE      cache root (default $HOME/.cache/kata-agent-py)
#        BUILD_DIR       where artefacts are copied (default <repo>/build)
#        JOBS            parallel make jobs (default nproc)
#        KERNEL_CONFIG_ONLY=1  stop after generating and verifying .config (no cache, no build)
# Outputs: $BUILD_DIR/<arch>/{vmlinuz,vmlinux | Image}, kernel.config, kernel.json
set -euo pipefail

arch=${1:-${ARCH:-$(uname -m)}}
# Called from make, ARCH=aarch64 arrives in the environment and MAKEFLAGS; the kernel's own
# make must only see the ARCH given to it explicitly below.
unset ARCH MAKEFLAGS MFLAGS MAKELEVEL
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tool="$repo/image-build/kernel-tool.py"
config_dir="$repo/kernel-config"
cache=${KATA_CACHE:-$HOME/.cache/kata-agent-py}
build_dir=${BUILD_DIR:-$repo/build}
jobs=${JOBS:-$(nproc)}
python=${PYTHON:-python3}

log() { printf '[kernel %s] %s\n' "$arch" "$*"; }
die() { printf '[kernel %s] error: %s\n' "$arch" "$*" >&2; exit 1; }

case "$arch" in
  x86_64)  karch=x86_64; make_arch=(ARCH=x86_64); targets=(bzImage vmlinux)
           outputs=("arch/x86/boot/bzImage:vmlinuz" "vmlinux:vmlinux") ;;
  aarch64) karch=arm64; targets=(Image)
           make_arch=(ARCH=arm64 "CROSS_COMPILE=${CROSS_COMPILE:-aarch64-linux-gnu-}")
           outputs=("arch/arm64/boot/Image:Image") ;;
  *) die "unknown arch '$arch' (x86_64 or aarch64)" ;;
esac

# --- kernel source and its identity -------------------------------------------------------
if [[ -n "${KERNEL_SRC:-}" ]]; then
  src=$(cd "$KERNEL_SRC" && pwd)
  version=$(make -s -C "$src" kernelversion)
  if rev=$(git -C "$src" rev-parse HEAD 2>/dev/null); then
    dirty=$(git -C "$src" status --porcelain --untracked-files=no | sha256sum | cut -c1-16)
    source_id="tree:$version:git:$rev:$dirty"
  else
    # Without git the tree is identified by its path and version; edit-in-place needs a new path.
    source_id="tree:$version:path:$src"
  fi
else
  tarball=${KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
  [[ -f "$tarball" ]] || die "no kernel source: $tarball missing (apt-get install linux-source-6.1) and KERNEL_SRC unset"
  tar_sha=$(sha256sum "$tarball" | cut -d' ' -f1)
  source_id="tarball:sha256:$tar_sha"
  unpack="$cache/kernel-src/${tar_sha:0:16}"
  if [[ ! -f "$unpack/.complete" ]]; then
    log "unpacking $tarball"
    mkdir -p "$cache/kernel-src"
    tmp=$(mktemp -d "$cache/kernel-src/.unpack.XXXXXX")
    tar -xJf "$tarball" -C "$tmp"
    touch "$tmp/.complete"
    rm -rf "$unpack"
    mv "$tmp" "$unpack"
  fi
  top=$(find "$unpack" -mindepth 1 -maxdepth 1 -type d | head -n1)
  [[ -f "$top/Makefile" ]] || die "no kernel tree inside $unpack"
  src=$top
  version=$(make -s -C "$src" kernelversion)
fi

key=$("$python" "$tool" key --source-id "$source_id" --config-dir "$config_dir" \
        --build-script "$repo/image-build/build-kernel.sh" --arch "$arch")
entry="$cache/kernel/$key"
log "source $source_id (Linux $version)"
log "cache key $key"

publish() {
  local dest="$build_dir/$arch" name
  mkdir -p "$dest"
  for name in "$@" kernel.config kernel.json; do
    cp "$entry/$name" "$dest/.$name.tmp"
    mv -f "$dest/.$name.tmp" "$dest/$name"
  done
  log "artefacts in $dest:"
  for name in "$@"; do
    log "  $name $(stat -c %s "$dest/$name") bytes"
  done
}

out_names=()
for pair in "${outputs[@]}"; do out_names+=("${pair#*:}"); done

if [[ -f "$entry/kernel.json" && "${KERNEL_CONFIG_ONLY:-0}" != 1 ]]; then
  log "cache hit: $entry"
  publish "${out_names[@]}"
  exit 0
fi

# --- build (one build per source+arch object tree at a time) --------------------------------
obj="$cache/kernel-obj/${source_id//[^A-Za-z0-9._-]/_}"
obj="${obj:0:200}-$arch"
mkdir -p "$obj" "$cache/kernel"
exec 9>"$obj.lock"
log "waiting for build lock $obj.lock"
flock 9
if [[ -f "$entry/kernel.json" && "${KERNEL_CONFIG_ONLY:-0}" != 1 ]]; then
  log "cache hit after waiting: $entry"
  publish "${out_names[@]}"
  exit 0
fi

kmake=(make -C "$src" O="$obj" "${make_arch[@]}")
log "merging fragments onto allnoconfig"
"$python" "$tool" merge --config-dir "$config_dir" --arch "$arch" --out "$obj/requested.config"
"${kmake[@]}" -s KCONFIG_ALLCONFIG="$obj/requested.config" allnoconfig
"${kmake[@]}" -s olddefconfig
log "verifying requested options survived"
"$python" "$tool" verify --config-dir "$config_dir" --arch "$arch" --config "$obj/.config" \
  || die "kernel config verification failed (see MISSING lines above; kernel-config/allow-missing.txt lists accepted losses)"

if [[ "${KERNEL_CONFIG_ONLY:-0}" == 1 ]]; then
  log "config only: $obj/.config"
  exit 0
fi

log "building ${targets[*]} with -j$jobs (log: $obj/build.log)"
start=$(date +%s)
if ! "${kmake[@]}" -j"$jobs" "${targets[@]}" >"$obj/build.log" 2>&1; then
  tail -n 40 "$obj/build.log" >&2
  die "kernel build failed (full log: $obj/build.log)"
fi
log "built in $(( $(date +%s) - start ))s"

stage=$(mktemp -d "$cache/kernel/.stage.XXXXXX")
for pair in "${outputs[@]}"; do
  cp "$obj/${pair%%:*}" "$stage/${pair#*:}"
done
cp "$obj/.config" "$stage/kernel.config"
release=$(cat "$obj/include/config/kernel.release")
"$python" "$tool" manifest --dir "$stage" --arch "$arch" --version "$release" \
  --source-id "$source_id" --key "$key" --config "$stage/kernel.config" "${out_names[@]}"
rm -rf "$entry"
mv "$stage" "$entry"
log "cached in $entry"
publish "${out_names[@]}"
