#!/bin/sh
# Install kmesh's files, the same way for `./build.sh -i` and the RPM's
# %install (one layout, one place):
#
#   install-layout.sh files DESTDIR PREFIX SRCDIR BUILDDIR
#       everything but the Python venv: the /usr/bin wrappers, the BPF
#       objects, the unit and its helper scripts, the default config, the
#       environment file, the README and the licenses.
#   install-layout.sh fix-venv DESTDIR PREFIX
#       a venv made under DESTDIR has DESTDIR in its shebangs, pyvenv.cfg and
#       activate scripts: take it out (the venv runs from PREFIX).
#
# Config files (kmesh.yaml, sysconfig) are installed only when missing, so a
# reinstall keeps local changes (the RPM marks them %config(noreplace)).
#
# Installed layout (PREFIX=/usr):
#   /usr/bin/kmesh-daemon, kmesh-cmd, kmeshctl,     wrappers around the venv's CLIs
#            kmesh-cni
#   /usr/lib/kmesh/venv/                           private Python venv (kmesh, xds-protos)
#   /usr/lib/kmesh/scripts/kmesh-*.sh              the unit's ExecStartPre/ExecStopPost helpers
#   /usr/lib/kmesh/bpf/*.bpf.o                     CO-RE BPF objects (per architecture)
#   /usr/lib/kmesh/bpf/legacy/*.bpf.o              the same for kernels before 5.12
#   /usr/lib/kmesh/native/libkmesh_l7.so           the native L7 engine (-l7-engine=native)
#   /usr/lib/systemd/system/kmesh.service          the unit
#   /etc/kmesh/kmesh.yaml, /etc/sysconfig/kmesh    config and the unit's environment
#   /usr/share/doc/kmesh/README.md                 the README (the unit's Documentation=)
#   /usr/share/licenses/kmesh/                     LICENSE (Apache-2.0), GPL-2.0-only.txt (bpf/)
set -eu

files() {
    dest=$1 prefix=$2 src=$3 build=$4
    lib="$dest$prefix/lib/kmesh"
    install -d "$lib/bpf/legacy" "$lib/native" "$dest$prefix/bin" "$dest$prefix/lib/systemd/system" \
        "$dest/etc/kmesh" "$dest/etc/sysconfig" "$lib/scripts" "$dest$prefix/share/doc/kmesh" \
        "$dest$prefix/share/licenses/kmesh"
    install -m 0644 "$build"/bpf/*.bpf.o "$lib/bpf/"
    install -m 0644 "$build"/bpf/legacy/*.bpf.o "$lib/bpf/legacy/"
    install -m 0755 "$build"/native/libkmesh_l7.so "$lib/native/"
    for b in kmesh-daemon kmesh-cmd kmeshctl kmesh-cni; do
        # shellcheck disable=SC2016  # the wrapper expands $KMESH_*_DIR and $@ itself
        printf '#!/bin/sh\nKMESH_BPF_DIR=${KMESH_BPF_DIR:-%s/lib/kmesh/bpf} KMESH_NATIVE_DIR=${KMESH_NATIVE_DIR:-%s/lib/kmesh/native} exec %s/lib/kmesh/venv/bin/%s "$@"\n' \
            "$prefix" "$prefix" "$prefix" "$b" > "$dest$prefix/bin/$b"
        chmod 0755 "$dest$prefix/bin/$b"
    done
    install -m 0755 "$src"/systemd/kmesh-start-pre.sh "$src"/systemd/kmesh-stop-post.sh "$lib/scripts/"
    install -m 0644 "$src/systemd/kmesh.service" "$dest$prefix/lib/systemd/system/kmesh.service"
    install -m 0644 "$src/README.md" "$dest$prefix/share/doc/kmesh/README.md"
    install -m 0644 "$src/LICENSE" "$src/LICENSES/GPL-2.0-only.txt" "$dest$prefix/share/licenses/kmesh/"
    [ -e "$dest/etc/kmesh/kmesh.yaml" ] || install -m 0644 "$src/config/kmesh.yaml" "$dest/etc/kmesh/kmesh.yaml"
    [ -e "$dest/etc/sysconfig/kmesh" ] || install -m 0644 "$src/systemd/kmesh.sysconfig" "$dest/etc/sysconfig/kmesh"
}

fix_venv() {
    dest=$1 prefix=$2
    [ -n "$dest" ] || return 0
    venv="$dest$prefix/lib/kmesh/venv"
    grep -rlIF "$dest" "$venv" | while IFS= read -r f; do
        sed -i "s|$dest||g" "$f"
    done
}

case "${1:-}" in
    files) shift; files "$@" ;;
    fix-venv) shift; fix_venv "$@" ;;
    *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
