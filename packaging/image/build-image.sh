#!/bin/sh
# Build kmesh's OCI image offline from packages: no base image from a
# registry, only Debian's archive and PyPI (./build.sh image runs this).
#
#   build-image.sh SRCDIR BUILDDIR TAG [ARCHIVE]
#
# A `buildah from scratch` container gets a Debian bookworm minbase root
# (debootstrap; the .debs are cached in BUILDDIR/image/debs), Python 3 and
# the system libbpf; kmesh's files go where the RPM puts them
# (packaging/install-layout.sh) and its venv is made with the image's own
# Python from the wheel in BUILDDIR/dist. Documentation, locales, apt's
# lists and pip are taken out, and the result is committed as one layer.
# ARCHIVE, if given, also gets the image as an oci-archive (for
# `ctr images import`, `podman load`, `skopeo copy` to a registry).
set -eu

src=$1 build=$2 tag=$3 archive=${4:-}
PYTHON=${PYTHON:-python3}      # a Python 3.11 with pip (build.sh passes its venv's)
SUITE=${KMESH_IMAGE_SUITE:-bookworm}
MIRROR=${KMESH_IMAGE_MIRROR:-http://deb.debian.org/debian}
say() { printf '==> %s\n' "$*" >&2; }

# shellcheck disable=SC2012  # the newest wheel by time; build.sh names them plainly
wheel=$(ls -t "$build"/dist/kmesh-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || { echo "build-image.sh: no wheel in $build/dist: run ./build.sh first" >&2; exit 1; }
version=$(basename "$wheel" | cut -d- -f2)
cache="$build/image/debs"
mkdir -p "$cache"

ctr=$(buildah from scratch)
mnt=""
cleanup() {
    [ -z "$mnt" ] || buildah umount "$ctr" >/dev/null 2>&1 || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM
mnt=$(buildah mount "$ctr")

say "debootstrap $SUITE minbase (python3, libbpf1) from $MIRROR (a few minutes the first time)"
debootstrap --variant=minbase --cache-dir="$cache" --include=python3,python3-venv,libbpf1 \
    "$SUITE" "$mnt" "$MIRROR" >"$build/image/debootstrap.log" 2>&1 || {
    tail -20 "$build/image/debootstrap.log" >&2
    echo "build-image.sh: debootstrap failed (log: $build/image/debootstrap.log); is $MIRROR reachable?" >&2
    exit 1
}

# The wheels of kmesh and what it needs, fetched (and built, for sdists) by
# this host's pip, which knows this host's index and its trust; the image's
# pip then installs them with no network. The image's Python is Debian's
# 3.11, as this host's must be (the binary wheels are cp311).
say "kmesh $version: wheels for its venv (pip on this host: $PYTHON)"
rm -rf "$build/image/wheels"
"$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$build/image/wheels" "$wheel" \
    >"$build/image/pip.log" 2>&1 || {
    tail -20 "$build/image/pip.log" >&2
    echo "build-image.sh: pip wheel failed (log: $build/image/pip.log); is the package index reachable?" >&2
    exit 1
}

say "kmesh $version: files by packaging/install-layout.sh, the venv with the image's Python"
sh "$src/packaging/install-layout.sh" files "$mnt" /usr "$src" "$build"
mkdir -p "$mnt/tmp/wheels"
cp "$build"/image/wheels/*.whl "$mnt/tmp/wheels/"
buildah run --isolation chroot "$ctr" -- sh -ec "
    python3 -m venv /usr/lib/kmesh/venv
    /usr/lib/kmesh/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /tmp/wheels kmesh
    /usr/lib/kmesh/venv/bin/pip uninstall -q -y pip setuptools
    rm -rf /tmp/wheels
    useradd --system --uid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kmesh
"

say "trimming"
rm -rf "$mnt"/usr/share/doc/[!k]* "$mnt"/usr/share/man "$mnt"/usr/share/info "$mnt"/usr/share/locale \
    "$mnt"/usr/share/lintian "$mnt"/var/cache/apt/* "$mnt"/var/lib/apt/lists/* "$mnt"/var/log/* \
    "$mnt"/etc/resolv.conf "$mnt"/usr/lib/systemd/system/kmesh.service "$mnt"/usr/lib/kmesh/scripts
: >"$mnt/etc/resolv.conf"
mkdir -p "$mnt/run/kmesh" "$mnt/sys/fs/bpf"

buildah umount "$ctr" >/dev/null
mnt=""
buildah config \
    --entrypoint '["/usr/bin/kmesh-daemon"]' \
    --cmd '["-enable-ads=false", "-config-file=/etc/kmesh/kmesh.yaml"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PYTHONDONTWRITEBYTECODE=1 \
    --workingdir / \
    --stop-signal SIGTERM \
    --label org.opencontainers.image.title=kmesh \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.description="kmesh-daemon: the sidecarless mesh data plane in eBPF" \
    --label org.opencontainers.image.licenses="Apache-2.0 AND GPL-2.0-only" \
    --label io.kmesh.run="podman run --network host --pid host --cgroupns host --cap-drop all --cap-add sys_admin,bpf,perfmon,net_admin,sys_resource,dac_override,sys_ptrace -v /sys/fs/bpf:/sys/fs/bpf -v /sys/fs/cgroup:/sys/fs/cgroup -v /run/kmesh:/run/kmesh -v /run/netns:/run/netns:rslave IMAGE [flags]" \
    "$ctr"
buildah commit -q --squash --rm "$ctr" "$tag" >/dev/null
trap - EXIT INT TERM
[ -z "$archive" ] || { rm -f "$archive"; buildah push -q "$tag" "oci-archive:$archive:$tag"; say "wrote $archive"; }
size=$(podman image inspect --format '{{.Size}}' "$tag")
say "built $tag: $((size / 1048576)) MiB"
