#!/usr/bin/env bash
# Builds fixity's pinned test tools from the Go modules beside this script.
#
# Usage: tests/tools/build.sh [--env FILE] [FAMILY...]
#
#   FAMILY     a directory under tests/tools holding a go.mod with `tool` directives
#              (kube, etcd, registry, cosign, helm, sigstore); all of them when none is named.
#   --env FILE also write FILE, a shell snippet to source: export PATH="<bin dirs>:$PATH"
#
# Each family is built into
#   ${FIXITY_TOOLS_CACHE:-$HOME/.cache/fixity-tools}/<family>-<hash>/bin/
# where <hash> covers the family's go.mod and go.sum, the Go version and the build
# recipe, so a pin change (or a new Go) gets a fresh directory and an unchanged one is
# reused without running the compiler. The bin directories are printed on stdout, one a
# line, in the order the families were named; progress and timings go to stderr.
# A typical caller:  PATH="$(tests/tools/build.sh | paste -sd: -):$PATH"
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${FIXITY_TOOLS_CACHE:-$HOME/.cache/fixity-tools}

# Bumped whenever the way binaries are built changes, so old cache entries are not reused.
recipe="v1 CGO_ENABLED=0 -trimpath -mod=readonly"

# Binary names for tool packages whose last path element is not the command's name.
declare -A bin_name=(
  [go.etcd.io/etcd/server/v3]=etcd
  [github.com/sigstore/rekor-tiles/v2/cmd/rekor-server/posix]=rekor-server
)

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

env_file=
families=()
while (($#)); do
  case $1 in
    --env) env_file=${2:?--env needs a file name}; shift 2 ;;
    --env=*) env_file=${1#--env=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) families+=("${1%/}"); shift ;;
  esac
done
if ((${#families[@]} == 0)); then
  for mod in "$tools_dir"/*/go.mod; do
    families+=("$(basename "$(dirname "$mod")")")
  done
fi
for f in "${families[@]}"; do
  [[ -f $tools_dir/$f/go.mod ]] || die "no tool family '$f' (no $tools_dir/$f/go.mod)"
done

# Find go: PATH first, then the usual install location (non-login shells often lack it).
go_bin=$(command -v go || true)
if [[ -z $go_bin && -x /usr/local/go/bin/go ]]; then go_bin=/usr/local/go/bin/go; fi
[[ -n $go_bin ]] || die "the Go toolchain ('go') was not found on PATH or in /usr/local/go/bin; install Go >= the 'go' line of tests/tools/*/go.mod"

# A go.work further up must not pull these modules into some other build.
export GOWORK=off CGO_ENABLED=0
go_version=$("$go_bin" env GOVERSION) || die "'$go_bin env' failed"
go_platform=$("$go_bin" env GOOS)/$("$go_bin" env GOARCH)

# The tool packages of a module, read from its go.mod (both `tool pkg` and `tool ( ... )`
# forms) without running go, so that a cache hit needs neither network nor module cache.
tool_packages() {
  awk '
    /^tool[ \t]*\($/ { inblock = 1; next }
    inblock && /^\)/ { inblock = 0; next }
    inblock && NF { print $1; next }
    /^tool[ \t]+[^( \t]/ { print $2 }
  ' "$1"
}

# The version that go.mod $1 requires of module $2.
module_version() {
  awk -v m="$2" '($1 == m && $2 ~ /^v/) || ($1 == "require" && $2 == m) {
    print ($1 == m ? $2 : $3); exit
  }' "$1"
}

# Extra -X flags for family $1: stamps the release version into binaries that otherwise
# report a placeholder (Kubernetes says v0.0.0-master, which breaks helm's kubeVersion
# checks against the apiserver and makes kubectl warn about version skew).
version_ldflags() {
  local mod=$tools_dir/$1/go.mod v
  case $1 in
    kube)
      v=$(module_version "$mod" k8s.io/kubernetes)
      local major=${v#v}; major=${major%%.*}
      local minor=${v#v*.}; minor=${minor%%.*}
      local pkg
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        printf -- '-X %s.%s=%s ' "$pkg" gitVersion "$v" "$pkg" gitMajor "$major" \
          "$pkg" gitMinor "$minor" "$pkg" gitTreeState clean
      done
      ;;
    helm)
      v=$(module_version "$mod" helm.sh/helm/v4)
      printf -- '-X helm.sh/helm/v4/internal/version.version=%s' "$v"
      ;;
    cosign)
      v=$(module_version "$mod" github.com/sigstore/cosign/v3)
      printf -- '-X sigs.k8s.io/release-utils/version.gitVersion=%s' "$v"
      ;;
  esac
}

binary_name() {
  local pkg=$1
  if [[ -n ${bin_name[$pkg]:-} ]]; then echo "${bin_name[$pkg]}"; else echo "${pkg##*/}"; fi
}

# Whether directory $1 holds every binary of the tool packages in "${pkgs[@]}".
have_all() {
  [[ -d $1 ]] || return 1
  local p
  for p in "${pkgs[@]}"; do [[ -x $1/$(binary_name "$p") ]] || return 1; done
}

# Explains a failed `go build`, whose full output is in $1.
explain_failure() {
  local family=$1 out=$2
  tail -n 30 "$out" >&2
  if grep -qE 'dial tcp|lookup .*(no such host|server misbehaving)|i/o timeout|connection refused|TLS handshake timeout|proxyconnect|unexpected EOF|network is unreachable|403 Forbidden|502 Bad Gateway|503 Service Unavailable' "$out"; then
    die "$family: could not download Go modules; is the Go module proxy reachable? (GOPROXY=$("$go_bin" env GOPROXY))"
  elif grep -qE 'missing go.sum entry|updates to go.mod needed|go: updates to go.sum needed' "$out"; then
    die "$family: go.mod/go.sum are incomplete; run 'go mod tidy' in $tools_dir/$family and commit the result"
  fi
  die "$family: go build failed (output above)"
}

bin_dirs=()
cached=()
for family in "${families[@]}"; do
  mod_dir=$tools_dir/$family
  mapfile -t pkgs < <(tool_packages "$mod_dir/go.mod")
  ((${#pkgs[@]})) || die "$family: go.mod has no tool directives"

  ldflags="-s -w $(version_ldflags "$family")"
  hash=$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" \
      <(printf '%s\n' "$go_version" "$go_platform" "$recipe" "$ldflags") \
    | sha256sum | cut -c1-16)
  entry=$cache_root/$family-$hash
  bin=$entry/bin

  start=$SECONDS
  if have_all "$bin"; then
    cached+=("$family")
    bin_dirs+=("$bin")
    continue
  fi

  mkdir -p "$entry"
  # Parallel test runs on one machine: only one of them builds a family, the other waits.
  exec {lock_fd}>"$entry/lock"
  flock "$lock_fd"
  if have_all "$bin"; then
    log "$family: built meanwhile by another process, in $bin"
  else
    log "$family: building ${pkgs[*]} with $go_version (minutes when cold)"
    tmp=$entry/bin.partial.$$
    out=$entry/build.log
    rm -rf "$tmp" "$bin"
    mkdir -p "$tmp"
    for pkg in "${pkgs[@]}"; do
      # Built from inside the module directory so its go.mod/go.sum pin every dependency;
      # -mod=readonly on the command line overrides any -mod in the caller's GOFLAGS.
      if ! (cd "$mod_dir" && "$go_bin" build -trimpath -mod=readonly -ldflags="$ldflags" \
              -o "$tmp/$(binary_name "$pkg")" "$pkg") >"$out" 2>&1; then
        rm -rf "$tmp"
        explain_failure "$family" "$out"
      fi
    done
    mv "$tmp" "$bin"   # appears whole or not at all
    log "$family: built in $((SECONDS - start))s -> $bin"
  fi
  exec {lock_fd}>&-
  bin_dirs+=("$bin")
done

if ((${#cached[@]})); then log "cached: ${cached[*]} (in $cache_root)"; fi

if [[ -n $env_file ]]; then
  path_prefix=$(IFS=:; echo "${bin_dirs[*]}")
  # shellcheck disable=SC2016 # $PATH is meant to expand when the file is sourced
  printf 'export PATH="%s:$PATH"\n' "$path_prefix" >"$env_file"
fi
printf '%s\n' "${bin_dirs[@]}"
