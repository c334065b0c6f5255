#!/bin/sh
# Compile kmesh's BPF programs: the one recipe build.sh and the RPM's %build
# share. Usage: bpf/compile.sh SRC_ROOT BUILD_DIR ARCH CLANG OBJDUMP
# (ARCH: x86 or arm64; BUILD_DIR holds vmlinux.h). Writes
#   BUILD_DIR/bpf/*.bpf.o          for kernels >= 5.12
#   BUILD_DIR/bpf/legacy/*.bpf.o   for 5.10/5.11: no atomic fetch instructions
#                                  (bpf/include/compat.h); the daemon picks
#                                  the flavour by probing the kernel
#   BUILD_DIR/bpf/tests/*.bpf.o    BPF_PROG_TEST_RUN unit tests (when present)
set -eu
src=$1 build=$2 arch=$3 clang=$4 objdump=$5
mkdir -p "$build/bpf/legacy" "$build/bpf/tests"

cc_bpf() {  # SRC OBJ [EXTRA CFLAGS]
    s=$1 o=$2; shift 2
    "$clang" -O2 -g -target bpf -mcpu=v3 -D__TARGET_ARCH_"$arch" -Wall -Werror \
        -I"$build" -I"$src/bpf/include" "$@" -c "$s" -o "$o"
}

for s in "$src"/bpf/*.bpf.c; do
    name=$(basename "${s%.c}").o
    echo "==> compiling bpf/$(basename "$s")" >&2
    cc_bpf "$s" "$build/bpf/$name"
    echo "==> compiling bpf/$(basename "$s") (legacy flavour, kernels < 5.12)" >&2
    cc_bpf "$s" "$build/bpf/legacy/$name" -DKMESH_LEGACY_ATOMICS
    # Before 5.12 an atomic (opcode 0xdb or 0xc3) must be a plain add: imm 0.
    if "$objdump" -d "$build/bpf/legacy/$name" \
            | grep -Eq '^ *[0-9]+:[[:space:]]+(db|c3) .. .. .. (0[1-9a-f]|[1-9a-f].)'; then
        echo "bpf/compile.sh: $name (legacy) has atomics kernels before 5.12 refuse: use compat.h's kmesh_* atomics" >&2
        exit 1
    fi
done
for s in "$src"/bpf/tests/*.bpf.c; do
    [ -e "$s" ] || continue
    echo "==> compiling bpf/tests/$(basename "$s")" >&2
    cc_bpf "$s" "$build/bpf/tests/$(basename "${s%.c}").o"
done
