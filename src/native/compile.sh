#!/bin/sh
# The native L7 engine as a shared library: compile.sh ROOT BUILD [CC]
# (./build.sh -b and the RPM's %build both run it).
set -eu
root=$1 build=$2 cc=${3:-cc}
mkdir -p "$build/native"
"$cc" -O2 -g -Wall -Wextra -Werror -fPIC -shared -pthread -I"$root/bpf/include" \
    -o "$build/native/libkmesh_l7.so.tmp" "$root/src/native/l7engine.c" "$root/src/native/l7route.c"
mv "$build/native/libkmesh_l7.so.tmp" "$build/native/libkmesh_l7.so"
