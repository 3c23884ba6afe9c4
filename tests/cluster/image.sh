#!/usr/bin/env bash
# Builds the test cluster's container images without a container engine: each layer is a
# tarball written by python's tarfile (sorted, owned by root, time 0: the same files give the
# same digest), pushed with crane to a plain-HTTP registry, and the config set with
# `crane mutate`.
#
# Usage:
#   tests/cluster/image.sh busybox REPOSITORY [CMD...]
#       Debian's static busybox as /bin/busybox, a link for each of its applets, PATH=/bin.
#       CMD is the image's command; by default a shell that waits and exits at once on
#       SIGTERM, so that its pods stop without using up their grace period.
#   tests/cluster/image.sh fixity REPOSITORY BINARY [LABEL=VALUE...]
#       fixity's image as the Dockerfile's final stage makes it: the static BINARY as
#       /fixity, /etc/passwd and /etc/group with the non-root user 65532 (the image's user),
#       the CA certificates, /tmp; no shell. Another label gives the same binary a new digest.
#
# REPOSITORY is HOST:PORT/NAME. Prints REPOSITORY@sha256:<digest> of the pushed image.
# Needs crane on PATH (tests/tools/build.sh registry), python3, readelf, and for `busybox`
# /bin/busybox from Debian's busybox-static (.ci/run installs it).
set -euo pipefail

die() { printf 'image.sh: %s\n' "$*" >&2; exit 1; }

kind=${1:-}
repository=${2:-}
[[ -n $kind && -n $repository ]] || die "usage: image.sh busybox|fixity REPOSITORY ..."
shift 2
command -v crane >/dev/null || die "crane is not on PATH (tests/tools/build.sh registry)"

work=$(mktemp -d "${TMPDIR:-/tmp}/fixity-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# layer DIR TARBALL [PATH=UID:GID...]: DIR's content as a layer; a PATH (relative to DIR)
# given here gets that owner instead of root.
layer() {
  python3 - "$@" <<'PY'
import os, sys, tarfile

root, out = sys.argv[1], sys.argv[2]
owners = {}
for spec in sys.argv[3:]:
    path, ids = spec.split("=")
    owners[path] = tuple(int(i) for i in ids.split(":"))

def add(tar, rel):
    info = tar.gettarinfo(os.path.join(root, rel), arcname=rel)
    info.uid, info.gid = owners.get(rel, (0, 0))
    info.uname = info.gname = ""
    info.mtime = 0
    if info.isreg():
        with open(os.path.join(root, rel), "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)

with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != ".":
            add(tar, rel_dir)
        for name in sorted(filenames):
            add(tar, os.path.normpath(os.path.join(rel_dir, name)))
PY
}

# csv ARG...: the arguments as one CSV record, which is how crane's list flags are parsed
# (so that an argument may hold commas and quotes).
csv() {
  local out='' arg q='"'
  for arg in "$@"; do out+=${out:+,}$q${arg//$q/$q$q}$q; done
  printf '%s' "$out"
}

# push TAG LAYER... -- MUTATE-FLAGS...: appends the layers to an empty OCI image, sets the
# config, and prints the digest reference.
push() {
  local tag=$1; shift
  local layers=()
  while [[ $1 != -- ]]; do layers+=(-f "$1"); shift; done
  shift
  quiet crane append --insecure --oci-empty-base "${layers[@]}" -t "$repository:$tag"
  quiet crane mutate --insecure "$repository:$tag" --set-platform linux/amd64 "$@" \
    -t "$repository:$tag"
  local digest
  digest=$(crane digest --insecure "$repository:$tag" 2>"$work/log") || quiet false
  printf '%s@%s\n' "$repository" "$digest"
}

# quiet CMD...: runs CMD, showing its output only when it fails.
quiet() {
  "$@" >>"$work/log" 2>&1 || { cat "$work/log" >&2; die "failed: $*"; }
}

static() { ! readelf -l "$1" 2>/dev/null | grep -q INTERP; }

case $kind in
  busybox)
    [[ -x /bin/busybox ]] || die "/bin/busybox is missing: apt-get install busybox-static"
    # Debian's dynamically linked busybox would need a libc in the image.
    static /bin/busybox || die "/bin/busybox is not static: apt-get install busybox-static"
    root=$work/root
    mkdir -p "$root/bin" "$root/tmp" "$root/etc"
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
      [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
    done
    printf '%s\n' 'root:x:0:0:root:/:/bin/sh' 'nobody:x:65534:65534:nobody:/:/bin/false' \
      >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' >"$root/etc/group"
    layer "$root" "$work/busybox.tar"
    if (($# == 0)); then
      set -- /bin/sh -c "trap 'exit 0' TERM; while :; do sleep 1 & wait; done"
    fi
    push busybox "$work/busybox.tar" -- --env PATH=/bin --cmd "$(csv "$@")"
    ;;
  fixity)
    binary=${1:?usage: image.sh fixity REPOSITORY BINARY [LABEL=VALUE...]}
    shift
    [[ -x $binary ]] || die "no executable $binary"
    static "$binary" || die "$binary is not a static binary"
    base=$work/base app=$work/app
    mkdir -p "$base/etc/ssl/certs" "$base/tmp" "$base/home/nonroot" "$app"
    chmod 1777 "$base/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
      'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$base/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$base/etc/group"
    [[ -r /etc/ssl/certs/ca-certificates.crt ]] \
      || die "/etc/ssl/certs/ca-certificates.crt is missing: apt-get install ca-certificates"
    cp /etc/ssl/certs/ca-certificates.crt "$base/etc/ssl/certs/"
    # /home/nonroot belongs to the user, as in distroless' nonroot image.
    layer "$base" "$work/base.tar" home/nonroot=65532:65532
    install -m 0755 "$binary" "$app/fixity"
    layer "$app" "$work/app.tar"
    labels=(-l org.opencontainers.image.title=fixity)
    for label in "$@"; do labels+=(-l "$label"); done
    push fixity "$work/base.tar" "$work/app.tar" -- \
      --user 65532:65532 --workdir /home/nonroot --entrypoint /fixity --cmd serve \
      --exposed-ports 8443/tcp,8080/tcp --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
      "${labels[@]}"
    ;;
  *) die "unknown image kind '$kind' (busybox or fixity)" ;;
esac
