#!/usr/bin/env bash
# Miri over the pure code: kv-core (codec, descriptors, auth, backend types, the
# loopback backend and the conformance suite run on it), kv-mem (everything but what
# needs syscalls Miri lacks: those tests are #[cfg_attr(miri, ignore)] with the reason)
# and kv-tier's policy, record and key code.
#
#   scripts/miri.sh          # the CI set (about ten minutes on two cores)
#   scripts/miri.sh --full   # also the tests that move MiB-sized buffers or run
#                            # hundreds of property cases (hours: every byte is interpreted)
#
# Needs: rustup component add --toolchain nightly miri rust-src
set -euo pipefail
cd "$(dirname "$0")/.."

full=false
[ "${1:-}" = "--full" ] && full=true

# -Zmiri-disable-isolation: the loopback backend's deadlines read the real clock, and
#   proptest looks up the current directory for its failure-persistence files.
# -Zmiri-permissive-provenance: descriptors carry addresses as u64 (the plugin ABI and
#   the wire format), so kv-mem turns integers back into pointers by design.
export MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-permissive-provenance ${MIRIFLAGS:-}"
# Property tests run a few cases each: Miri is ~1000x slower than native.
export PROPTEST_CASES="${PROPTEST_CASES:-4}"

lock=()
if [ -e /tmp/kvx-cargo.lock ] && command -v flock >/dev/null; then
    lock=(flock /tmp/kvx-cargo.lock)
fi
miri() { "${lock[@]}" cargo +nightly miri test "$@"; }

# Conformance cases that copy 1-16 MiB or build 10 000-descriptor lists (and run_all,
# which runs them all, and the mutants test, which runs the whole suite once per
# mutant): ten minutes to hours each under Miri. The loopback paths they take are the
# ones the small cases take.
slow_cases=(write_sizes read_sizes scattered_write scattered_read cancel cancel_stops_copies
    deregister_busy dropped_peer disconnect_inflight notification_after_data
    read_notification run_all_passes)
# Delivers two 32 MiB notifications through HMAC-SHA256: tens of minutes under Miri.
slow_lib=(loopback::node::tests::sessions_and_inbox_are_bounded)

skips=()
if ! $full; then
    for c in "${slow_cases[@]}" "${slow_lib[@]}"; do skips+=(--skip "$c"); done
fi

miri -p kv-core --lib -- "${skips[@]}"
miri -p kv-core --test loopback_conformance -- "${skips[@]}"
miri -p kv-mem
miri -p kv-tier --lib -- policy:: record:: key::
if $full; then
    miri -p kv-core --test mutants
    # 512 proptest cases of up to 9 000 bytes each (its own config; PROPTEST_CASES does
    # not lower it); the record:: unit tests and the tier_record fuzz target cover the
    # same decoder in CI.
    miri -p kv-tier --test record_props
fi
