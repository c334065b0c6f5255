#!/usr/bin/env bash
# kmesh build script. Kmesh's flags:
#   -b  build: vmlinux.h from the running kernel's BTF, bpf/*.bpf.c -> CO-RE
#       objects in build/bpf/, the native L7 engine in build/native/, and the
#       Python wheel in build/dist/
#   -i  install CLIs, objects, unit and default config (same files as the RPM)
#   -c  clean build outputs
#   -u  uninstall (detaches and unpins first)
#   rpm [RELEASE]  build the RPM (packaging/rpm) into build/rpm/RPMS
#   image [TAG [ARCHIVE]]  build the OCI image offline (packaging/image), as
#       TAG (default localhost/kmesh:VERSION), also to ARCHIVE (oci-archive)
# and the two commands of the README:
#   setup  install what building and testing need (apt packages, .venv)
#   demo   setup + build, then run kmesh-daemon on the bundled standalone example
#   test   setup + build, then run the whole test suite
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD="$ROOT/build"
VENV="${KMESH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
PREFIX="${PREFIX:-/usr}"
DESTDIR="${DESTDIR:-}"

APT_PACKAGES=(clang-19 llvm-19 bpftool libbpf-dev libbpf1 curl wrk nginx-light iperf3 iproute2 procps shellcheck systemd
              rpm rpmlint debootstrap systemd-container python3-pip python3-setuptools python3-wheel python3-venv
              qemu-system-x86 busybox-static cpio zstd podman buildah runc containernetworking-plugins)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

llvm_objdump_bin() {
    for c in llvm-objdump-19 llvm-objdump; do command -v "$c" >/dev/null 2>&1 && { echo "$c"; return; }; done
    die "llvm-objdump not found: run ./build.sh setup"
}

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (eBPF, cgroups and installs do): run it with sudo"; }

clang_bin() {
    for c in clang-19 clang; do command -v "$c" >/dev/null 2>&1 && { echo "$c"; return; }; done
    die "clang not found: run ./build.sh setup"
}

setup_system() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]}; install clang, bpftool, libbpf and curl with your package manager"
        need_root "installing ${missing[*]}"
        say "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.kmesh-deps" want
    want=$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing Python packages into $VENV"
        "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
        "$VENV/bin/pip" install -q -e "$ROOT[test,bench]"
        echo "$want" > "$stamp"
    fi
}

do_setup() { setup_system; setup_venv; }

build_bpf() {
    local clang; clang=$(clang_bin)
    mkdir -p "$BUILD/bpf"
    [ -r /sys/kernel/btf/vmlinux ] || die "/sys/kernel/btf/vmlinux missing: kmesh needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF)"
    if [ ! -s "$BUILD/vmlinux.h" ] || [ /sys/kernel/btf/vmlinux -nt "$BUILD/vmlinux.h" ]; then
        say "generating vmlinux.h from the running kernel's BTF"
        bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$BUILD/vmlinux.h.tmp"
        mv "$BUILD/vmlinux.h.tmp" "$BUILD/vmlinux.h"
    fi
    local arch; arch=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
    sh "$ROOT/bpf/compile.sh" "$ROOT" "$BUILD" "$arch" "$clang" "$(llvm_objdump_bin)"
}

build_native() {
    # The native L7 engine (src/native): a shared library the daemon loads with ctypes.
    say "compiling src/native/l7engine.c"
    sh "$ROOT/src/native/compile.sh" "$ROOT" "$BUILD" "${CC:-cc}"
}

build_python() {
    say "building the Python wheel"
    mkdir -p "$BUILD/dist"
    local py="$PYTHON"; [ -x "$VENV/bin/python" ] && py="$VENV/bin/python"
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$BUILD/dist" "$ROOT" 2>/dev/null \
        || "$py" -m pip wheel -q --no-deps -w "$BUILD/dist" "$ROOT"
}

do_build() { build_bpf; build_native; build_python; }

do_clean() { rm -rf "$BUILD" "$ROOT"/src/*.egg-info; say "cleaned"; }

# Installed layout: packaging/install-layout.sh, shared with the RPM's %install.
LIBDIR="$DESTDIR$PREFIX/lib/kmesh"
LAYOUT="$ROOT/packaging/install-layout.sh"
# Everything install puts down, for uninstall (the config in /etc is kept).
INSTALLED_PATHS=("$PREFIX/lib/kmesh" "$PREFIX/bin/kmesh-daemon" "$PREFIX/bin/kmesh-cmd" "$PREFIX/bin/kmeshctl" "$PREFIX/bin/kmesh-cni"
                 "$PREFIX/lib/systemd/system/kmesh.service" "$PREFIX/share/doc/kmesh"
                 "$PREFIX/share/licenses/kmesh")

do_install() {
    [ -n "$DESTDIR" ] || need_root "install"
    ls "$BUILD"/dist/kmesh-*.whl >/dev/null 2>&1 && ls "$BUILD"/bpf/*.bpf.o >/dev/null 2>&1 \
        || die "nothing built yet: run ./build.sh -b first"
    say "installing into ${DESTDIR:-/}"
    # The RPM's venv uses the distribution's python3-* packages; here they
    # come from PyPI (Debian's protobuf and grpcio are too old for xds-protos).
    "$PYTHON" -m venv "$LIBDIR/venv"
    "$LIBDIR/venv/bin/pip" install -q --disable-pip-version-check "$(ls -t "$BUILD"/dist/kmesh-*.whl | head -1)"
    sh "$LAYOUT" fix-venv "$DESTDIR" "$PREFIX"
    sh "$LAYOUT" files "$DESTDIR" "$PREFIX" "$ROOT" "$BUILD"
    [ -n "$DESTDIR" ] || ! command -v systemctl >/dev/null || systemctl daemon-reload 2>/dev/null || true
    say "installed: $PREFIX/bin/kmesh-daemon, $PREFIX/bin/kmesh-cmd, kmesh.service, /etc/kmesh/kmesh.yaml, /etc/sysconfig/kmesh"
}

do_uninstall() {
    [ -n "$DESTDIR" ] || need_root "uninstall"
    if [ -z "$DESTDIR" ]; then
        # What the RPM's %preun does: stop (detaches and unpins), then clean
        # up whatever a crashed daemon left, then unmount what kmesh mounted.
        if command -v systemctl >/dev/null && systemctl is-active -q kmesh.service 2>/dev/null; then
            systemctl disable --now kmesh.service 2>/dev/null || true
        fi
        [ -x "$PREFIX/bin/kmesh-daemon" ] && "$PREFIX/bin/kmesh-daemon" cleanup --unmount || true
    fi
    for p in "${INSTALLED_PATHS[@]}"; do rm -rf "$DESTDIR$p"; done
    [ -n "$DESTDIR" ] || ! command -v systemctl >/dev/null || systemctl daemon-reload 2>/dev/null || true
    say "uninstalled (config in /etc/kmesh and /etc/sysconfig/kmesh kept)"
}

# The RPM, built here (Debian's rpm and the macros file); on openEuler use
# rpmbuild directly (packaging/rpm/README.md).
do_rpm() {
    local release="${1:-1}" top="$BUILD/rpm" spec="$ROOT/packaging/rpm/kmesh.spec"
    local version xds
    version=$(sed -n 's/^Version: *//p' "$spec")
    xds=$(sed -n 's/^%global xds_protos_version //p' "$spec")
    mkdir -p "$top/SOURCES"
    say "source tarball kmesh-$version.tar.gz (the working tree's files)"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --transform "s,^,kmesh-$version/," -czf "$top/SOURCES/kmesh-$version.tar.gz")
    [ -e "$top/SOURCES/xds_protos-$xds-py3-none-any.whl" ] \
        || "$PYTHON" -m pip download -q --no-deps "xds-protos==$xds" -d "$top/SOURCES"
    say "rpmbuild (release $release)"
    rpmbuild --load "$ROOT/packaging/rpm/macros.kmesh-debian" --nodeps --define "_topdir $top" \
        --define "kmesh_release $release" -bb "$spec" > "$top/rpmbuild.log" 2>&1 \
        || { tail -30 "$top/rpmbuild.log" >&2; die "rpmbuild failed (log: $top/rpmbuild.log)"; }
    ls "$top"/RPMS/*/kmesh-"$version"-"$release".*.rpm
}

# The OCI image, from Debian's packages and the wheel (docs/containers.md).
do_image() {
    need_root "building the image (debootstrap, buildah)"
    do_setup
    do_build
    local version
    version=$("$VENV/bin/python" -c 'import kmesh; print(kmesh.__version__)')
    PYTHON="$VENV/bin/python" sh "$ROOT/packaging/image/build-image.sh" "$ROOT" "$BUILD" "${1:-localhost/kmesh:$version}" "${2:-}"
}

do_test() {
    need_root "the test suite"
    do_setup
    do_build
    say "running the tests"
    cd "$ROOT"
    "$VENV/bin/python" -m pytest "$@"
    # The whole run (no pytest selection) also proves the other kernels:
    # Debian's 5.10, 6.1 and 6.12 under qemu (docs/kernels.md).
    if [ $# -eq 0 ] && [ "${KMESH_KERNEL_MATRIX:-1}" != 0 ]; then
        say "kernel matrix: kmesh's tests on other kernels under qemu (KMESH_KERNEL_MATRIX=0 skips it)"
        "$VENV/bin/python" -m tests.kernels.matrix
    fi
}

do_demo() {
    need_root "the demo"
    do_setup
    do_build
    exec "$VENV/bin/python" "$ROOT/examples/demo.py" "$@"
}

case "${1:-}" in
    -b|build) do_setup; do_build ;;
    -i|install) do_install ;;
    -c|clean) do_clean ;;
    -u|uninstall) do_uninstall ;;
    rpm) shift; do_rpm "$@" ;;
    image) shift; do_image "$@" ;;
    setup) do_setup ;;
    test) shift; do_test "$@" ;;
    demo) shift; do_demo "$@" ;;
    *) sed -n "2,14p" "$0" | sed "s/^# \{0,1\}//"; exit 2 ;;
esac
