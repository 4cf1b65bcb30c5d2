#!/usr/bin/env bash
# AddressSanitizer over the tests of the backends that touch raw memory and native
# libraries (tcp, ucx, libfabric) and of kv-agent, on nightly:
#
#   scripts/asan.sh                 # all four crates
#   scripts/asan.sh -p kv-backend-tcp -- --skip two_process   # cargo test arguments
#
# `--target` keeps the sanitizer flags off build scripts and proc macros; the build goes
# to target/asan so it does not disturb the normal one. The C libraries are not
# instrumented (they are opened at run time), but ASan still checks every access our
# code makes to memory they hand out, and their allocations go through ASan's malloc.
set -euo pipefail
cd "$(dirname "$0")/.."

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(-p kv-backend-tcp -p kv-backend-ucx -p kv-backend-libfabric -p kv-agent)
fi

export RUSTFLAGS="-Zsanitizer=address ${RUSTFLAGS:-}"
export RUSTDOCFLAGS="-Zsanitizer=address ${RUSTDOCFLAGS:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/asan}"
# UCX's memory hooks (UCM) rewrite mmap/munmap/brk, which ASan intercepts too: with
# them on, an instrumented process jumps to a wild address as soon as UCX loads.
# The backend does not rely on UCX memory events (it registers memory explicitly).
export UCX_MEM_EVENTS=no
# Leaks are checked, except the few scripts/lsan.supp names (each with its reason).
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
# libfabric is dlopen'ed and dlclose'd by each backend; once it is unmapped, what its
# globals still point to (provider tables, strdup'ed names) looks leaked to LSan, from
# "<unknown module>" frames no suppression can name. Preloading keeps it mapped, so LSan
# sees those roots; a leak in our own code still shows.
lf=$(ldconfig -p 2>/dev/null | awk '/libfabric\.so\.1 /{p=$NF} END{print p}')
if [ -n "$lf" ]; then
    export LD_PRELOAD="$lf${LD_PRELOAD:+:$LD_PRELOAD}"
fi
# fast_unwind_on_malloc=0: libfabric has no frame pointers, so the fast unwinder stops
# inside it; the slow one reaches our frames, which the libfabric suppression in
# scripts/lsan.supp names (so it can be narrower than "anything in libfabric.so").
export ASAN_OPTIONS="detect_stack_use_after_return=1:fast_unwind_on_malloc=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

lock=()
if [ -e /tmp/kvx-cargo.lock ] && command -v flock >/dev/null; then
    lock=(flock /tmp/kvx-cargo.lock)
fi
"${lock[@]}" cargo +nightly test --no-fail-fast --target x86_64-unknown-linux-gnu "${args[@]}"
