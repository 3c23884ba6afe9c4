#!/usr/bin/env bash
# Builds fixity's fuzz targets and runs each for a bounded time (libFuzzer through cargo-fuzz).
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
#   SECONDS  per target (default 20: the short run of the test command; the longer run
#            documented in fuzz/README.md gives each target 300 or more)
#   TARGET   any of: review policy manifest reference registry evidence credentials
#            (default: all)
#
# Each target starts from the seeds in fuzz/seeds/TARGET (inputs made for this project, and
# every input that once found a bug) plus what earlier runs left in fuzz/corpus/TARGET, and
# adds to the latter. A crash, a failed property or a hang stops that target; its input is
# kept in fuzz/artifacts/TARGET/ and the script fails. The closing table gives, per target,
# the executions, the coverage (libFuzzer's edge count `cov` and feature count `ft`) and the
# corpus size.
#
# Runs on stable Rust with `--sanitizer none`: the targets are safe Rust (fixity forbids
# unsafe code), so AddressSanitizer would only slow them. FIXITY_FUZZ_SANITIZER=address uses
# a nightly toolchain instead, where one is installed. Needs cargo-fuzz (.ci/run installs it).
#
# FIXITY_FUZZ_BUILD chooses the build, each in a target directory of its own:
#   quick  (default) opt-level 1 (fuzz/Cargo.toml) and 16 codegen units: the build the test
#          command can afford cold (fuzz/README.md has the figures)
#   full   cargo-fuzz's own: opt-level 3, one codegen unit, several times longer to build
#          cold, for long runs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${1:-20}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(review policy manifest reference registry evidence credentials)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is not installed (cargo install --locked cargo-fuzz)" >&2
  exit 1
fi
sanitizer=${FIXITY_FUZZ_SANITIZER:-none}
toolchain=+stable
[[ $sanitizer == none ]] || toolchain=+nightly
mode=${FIXITY_FUZZ_BUILD:-quick}
case $mode in
  quick) build=(--codegen-units 16) ;;
  full)
    build=()
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=3
    ;;
  *)
    echo "fuzz/run.sh: FIXITY_FUZZ_BUILD is quick or full, not $mode" >&2
    exit 2
    ;;
esac
build+=(--sanitizer "$sanitizer" --target-dir "target/$mode")

# The largest input each target needs: a review body under the webhook's limit is larger,
# but what the decoder and the evaluator do with a body is found with smaller ones.
declare -A max_len=([review]=65536 [policy]=16384 [manifest]=16384 [reference]=512
  [registry]=16384 [evidence]=32768 [credentials]=8192)

# One build of every target: they share fixity and its dependencies.
built=$SECONDS
cargo "$toolchain" fuzz build "${build[@]}" >&2
printf 'fuzz/run.sh: the %s build took %ss\n' "$mode" $((SECONDS - built)) >&2
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  log=$(mktemp "${TMPDIR:-/tmp}/fixity-fuzz-$target.XXXXXX")
  printf '\n==> fuzz %s for %ss\n' "$target" "$seconds" >&2
  status=0
  cargo "$toolchain" fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len="${max_len[$target]:-16384}" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$target/" \
    >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  corpus=$(find "corpus/$target" -type f | wc -l)
  summary+=("$(printf '%-10s %12s execs  %-22s corpus %s' "$target" "${execs:-?}" "${cov:-cov: ?}" "$corpus")")
  if ((status != 0)); then
    failed+=("$target")
    echo "fuzz/run.sh: $target failed (exit $status); the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
  else
    rm -f "$log"
  fi
done

echo
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz/run.sh: failing targets: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
