#!/bin/bash
# Build the minimal busybox root filesystem tarball the validation programs unpack into each
# bundle (they look for rootfs-<GOARCH>.tar.gz in their working directory). The tarball holds
# the filesystem at its top level: the programs use the bundle directory itself as root (".").
#
# usage: make-rootfs.sh OUTPUT.tar.gz [BUSYBOX]
set -euo pipefail

out=${1:?usage: make-rootfs.sh OUTPUT.tar.gz [BUSYBOX]}
busybox=${2:-/bin/busybox}

[[ -x $busybox ]] || { echo "make-rootfs: $busybox is not executable (apt-get install busybox-static)" >&2; exit 1; }
# The container has no loader or libraries: only a static busybox works.
ldd_out=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
if ! grep -Eq 'not a dynamic executable|statically linked' <<<"$ldd_out"; then
    echo "make-rootfs: $busybox is dynamically linked; a static busybox is required" >&2
    exit 1
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/kata-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,root,var/run,run,mnt,home}
chmod 0755 "$stage"
chmod 1777 "$stage/tmp"
chmod 0700 "$stage/root"
install -m 0755 "$busybox" "$stage/bin/busybox"

# One symlink per applet, at the path busybox itself reports for it.
while IFS= read -r applet; do
    [[ $applet == */* ]] || continue          # skips "linuxrc" at the top level
    [[ $applet == bin/busybox ]] && continue
    [[ -e $stage/$applet || -L $stage/$applet ]] && continue
    mkdir -p "$stage/$(dirname "$applet")"
    ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)

cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
cat >"$stage/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
tty:x:5:
nogroup:x:65534:
EOF
echo "validation" >"$stage/etc/hostname"
: >"$stage/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n' >"$stage/etc/hosts"

mkdir -p "$(dirname "$out")"
tmp_out="$out.tmp.$$"
# Fixed owner, order and mtime: the same busybox always gives the same tarball.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$stage" -czf "$tmp_out" .
mv -f "$tmp_out" "$out"
echo "make-rootfs: wrote $out ($(du -h "$out" | cut -f1))" >&2
