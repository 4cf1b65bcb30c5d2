#!/usr/bin/env bash
# Checks that UNSAFE.md covers the workspace's unsafe code, file by file.
#
#   scripts/unsafe-check.sh                       # the tree as it is
#   scripts/unsafe-check.sh kv-backend-tcp=/path/to/other/kv-backend-tcp ...
#                                                 # as if CRATE were replaced by DIR
#
# Lists every .rs file of the workspace crates (Cargo.toml `members`) and of fuzz/
# whose code says `unsafe` (text after `//` is ignored, so comment-only hits do not
# count; target/ and the fuzz corpora are skipped), with the number of hits. Fails
# (exit 1), naming the file, when
#   * a file with unsafe code is not documented in UNSAFE.md: its workspace path must
#     appear in backticks in a heading (`### ...`) or as the first cell of a table row;
#   * UNSAFE.md names (in backticks, anywhere) a workspace .rs path that does not exist;
#   * a file UNSAFE.md documents (heading or first cell) has no unsafe code any more.
# A line `<!-- unsafe-check: pending CRATE ... -->` in UNSAFE.md marks crates whose
# sections describe a version not merged yet: their findings are warnings, unless the
# crate is replaced on the command line (then they count). Delete the line at the merge.
# Exit 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."
set -f # paths and doc tokens are never globbed

doc="${UNSAFE_MD:-UNSAFE.md}"
if [ ! -f "$doc" ]; then
    echo "unsafe-check: $doc not found" >&2
    exit 2
fi

# The crates: workspace members, and fuzz (outside the workspace, cargo-fuzz builds it).
mapfile -t crates < <(sed -n '/^members *= *\[/,/\]/p' Cargo.toml | grep -o '"[^"]*"' | tr -d '"')
crates+=(fuzz)

declare -A root=() replaced=() pending=()
for c in "${crates[@]}"; do
    root[$c]="$c"
done
for arg in "$@"; do
    case "$arg" in
    *=*)
        c="${arg%%=*}"
        d="${arg#*=}"
        if [ -z "${root[$c]+x}" ]; then
            echo "unsafe-check: $c is not a workspace crate (nor fuzz)" >&2
            exit 2
        fi
        if [ ! -d "$d" ]; then
            echo "unsafe-check: $d is not a directory" >&2
            exit 2
        fi
        root[$c]="${d%/}"
        replaced[$c]=1
        ;;
    *)
        echo "usage: $0 [CRATE=DIR ...]" >&2
        exit 2
        ;;
    esac
done
for c in $(sed -n 's/^<!-- unsafe-check: pending \(.*\) -->$/\1/p' "$doc"); do
    [ -z "${replaced[$c]+x}" ] && pending[$c]=1
done

# The crate a workspace path belongs to (longest matching crate dir), or nothing.
crate_of() {
    local p="$1" best="" c
    for c in "${crates[@]}"; do
        if [[ "$p" == "$c/"* ]] && [ ${#c} -gt ${#best} ]; then
            best="$c"
        fi
    done
    printf '%s' "$best"
}

# Where a workspace path lies on disk (through a replaced crate's directory).
on_disk() {
    local c
    c="$(crate_of "$1")"
    printf '%s/%s' "${root[$c]}" "${1#"$c"/}"
}

errors=0
warnings=0
problem() { # crate, message
    if [ -n "${pending[$1]+x}" ]; then
        echo "  warning (pending $1): $2"
        warnings=$((warnings + 1))
    else
        echo "  ERROR: $2"
        errors=$((errors + 1))
    fi
}

# Files with unsafe code: "path count" lines, by workspace path.
declare -A hits=()
for c in "${crates[@]}"; do
    dir="${root[$c]}"
    [ -d "$dir" ] || continue
    while IFS= read -r -d '' f; do
        n=$(sed 's://.*$::' "$f" | grep -ow 'unsafe' | wc -l || true)
        if [ "$n" -gt 0 ]; then
            hits["$c/${f#"$dir"/}"]=$n
        fi
    done < <(find "$dir" \( -name target -o -name .git -o -path "$dir/corpus" -o -path "$dir/artifacts" \) -prune \
        -o -name '*.rs' -type f -print0)
done

# What UNSAFE.md documents (headings, first table cells) and names (anywhere).
declare -A documented=() named=()
while IFS= read -r line; do
    case "$line" in
    '#'*) cells="$line" ;;
    '|'*)
        cells="${line#|}"
        cells="${cells%%|*}"
        ;;
    *) cells="" ;;
    esac
    for tok in $(grep -o '`[^`]*`' <<<"$line" | tr -d '`' | tr ' ' '\n'); do
        p="${tok%%::*}"
        p="${p%,}"
        [[ "$p" == *.rs ]] || continue
        [ -n "$(crate_of "$p")" ] || continue
        named[$p]=1
    done
    if [ -n "$cells" ]; then
        for tok in $(grep -o '`[^`]*`' <<<"$cells" | tr -d '`'); do
            [[ "$tok" == *.rs ]] || continue
            [ -n "$(crate_of "$tok")" ] || continue
            documented[$tok]=1
        done
    fi
done <"$doc"

echo "unsafe-check: files with unsafe code (hits), against $doc"
for p in $(printf '%s\n' "${!hits[@]}" | sort); do
    printf '  %4d  %s\n' "${hits[$p]}" "$p"
done
for p in $(printf '%s\n' "${!hits[@]}" | sort); do
    if [ -z "${documented[$p]+x}" ]; then
        problem "$(crate_of "$p")" "$p has unsafe code but no section or row in $doc"
    fi
done
for p in $(printf '%s\n' "${!named[@]}" | sort); do
    if [ ! -f "$(on_disk "$p")" ]; then
        problem "$(crate_of "$p")" "$doc names $p, which does not exist"
    elif [ -n "${documented[$p]+x}" ] && [ -z "${hits[$p]+x}" ]; then
        problem "$(crate_of "$p")" "$doc documents $p, which has no unsafe code"
    fi
done

replaced_list="${!replaced[*]}"
echo "unsafe-check: ${#hits[@]} file(s) with unsafe code${replaced_list:+ (replaced: $replaced_list)}; $errors error(s), $warnings warning(s)"
[ "$errors" -eq 0 ]
