#!/usr/bin/env bash
# Builds a real kube-apiserver for steer's Kubernetes integration tests (tests/k8s).
#
# No prebuilt Kubernetes binary, container runtime or Go toolchain of the right age can be
# had here, only Debian's registry. So the binary is built from what Debian ships:
#   - the source: bookworm's `kubernetes` source package (1.20.5+really1.20.2), whose
#     upstream tarball is the full v1.20.2 tree, vendor/ included (so GOPROXY=off works);
#   - the compiler: Go 1.15 from bullseye (golang-1.15-go, golang-1.15-src), the Go that
#     Kubernetes 1.20 was released with (bookworm only has 1.19, untried with this tree); it
#     is unpacked with `dpkg -x` into a private dir, so nothing on the system changes;
#   - etcd: bookworm's etcd-server (3.4), installed as a normal package.
# Both Debian indexes are fetched into a PRIVATE apt list dir, so the system's apt config
# and package lists stay exactly as they were (bookworm only, no deb-src).
#
# Usage: scripts/kube-apiserver.sh build
#   Idempotent. The binary goes to ${STEER_KUBE_CACHE:-/var/cache/steer/kube}/v1.20.2/,
#   outside the repo, so fresh clones on the same machine reuse it. A run with a cached
#   binary that reports v1.20.2 returns at once. The build tree (~2 GB with Go's cache) is
#   deleted after a successful build; after a failed one it stays under .../v1.20.2/work for
#   inspection, with the downloads, which the next run reuses.
#   Takes 5 to 12 minutes on 2 cores (5 measured here). Logs go to stderr.
set -Eeuo pipefail
# Expected failures say what went wrong through die(); this names any other failing step,
# which set -e alone would end on silently. (-E: also inside functions.)
trap 'log "error: exit $? at line $LINENO: $BASH_COMMAND (see above)"' ERR

readonly KUBE_VERSION=v1.20.2
# Debian's upstream version for the 1.20.2 tree (the 1.20.5 upload was reverted to 1.20.2).
readonly DEBIAN_UPSTREAM=1.20.5+really1.20.2
# The commit of tag v1.20.2, as `git archive` substituted it into hack/lib/version.sh.
readonly KUBE_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
readonly GO_PACKAGES=(golang-1.15-go golang-1.15-src)
# etcd-server: run by the tests; rsync: used by kube's build scripts to copy binaries out;
# dpkg-dev: dpkg-source, to unpack the source package with Debian's (security) patches.
readonly APT_PACKAGES=(etcd-server rsync dpkg-dev)

readonly CACHE_ROOT=${STEER_KUBE_CACHE:-/var/cache/steer/kube}
readonly CACHE_DIR=$CACHE_ROOT/$KUBE_VERSION
readonly BINARY=$CACHE_DIR/kube-apiserver
readonly WORK=$CACHE_DIR/work

log() { printf 'kube-apiserver.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  cat >&2 <<EOF
usage: $0 build
  Builds kube-apiserver $KUBE_VERSION (5 to 12 minutes) into $BINARY,
  or does nothing if it is already there. Set STEER_KUBE_CACHE to cache elsewhere.
EOF
}

cached_binary_ok() {
  [ -x "$BINARY" ] && [ "$("$BINARY" --version 2>/dev/null)" = "Kubernetes $KUBE_VERSION" ]
}

ensure_apt_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root, or apt-get install them"
  log "installing ${missing[*]}"
  apt-get update -q
  # Installing etcd-server does not start a cluster here (policy-rc.d / no systemd); the
  # tests run their own etcd on free ports either way.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# The Debian mirror this machine already uses (deb822 .sources or one-line .list files),
# so the build fetches from the same place as everything else.
debian_mirror() {
  local uri
  uri=$(
    {
      grep -hsE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources \
        | awk '{ for (i = 2; i <= NF; i++) print $i }'
      grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | sed -E 's/\[[^]]*\]//' | awk '{ print $2 }'
    } | grep -E '/debian/?$' | head -n 1 || true
  )
  echo "${uri:-http://deb.debian.org/debian}"
}

# apt options that point apt at the private list and state dir only. The binary caches are
# disabled so apt does not overwrite the system's pkgcache.bin with these lists.
APT_PRIVATE=()
setup_private_apt() {
  local mirror
  mirror=$(debian_mirror)
  mkdir -p "$WORK/apt/lists/partial"
  cat >"$WORK/apt/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main
EOF
  APT_PRIVATE=(
    -o "Dir::Etc::sourcelist=$WORK/apt/sources.list"
    -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o Dir::Cache::pkgcache=
    -o Dir::Cache::srcpkgcache=
    # Downloads land in a root-owned dir; without this apt warns it cannot sandbox as _apt.
    -o APT::Sandbox::User=root
  )
  log "private apt lists from $mirror (bookworm deb-src, bullseye deb)"
  apt-get "${APT_PRIVATE[@]}" update -q
}

download() {
  local dl=$WORK/dl
  mkdir -p "$dl"
  if compgen -G "$dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" >/dev/null \
    && compgen -G "$dl/golang-1.15-go_*.deb" >/dev/null \
    && compgen -G "$dl/golang-1.15-src_*.deb" >/dev/null; then
    log "reusing downloads in $dl"
    return 0
  fi
  setup_private_apt
  log "downloading the kubernetes source package and ${GO_PACKAGES[*]}"
  (cd "$dl" && apt-get "${APT_PRIVATE[@]}" source --download-only kubernetes)
  (cd "$dl" && apt-get "${APT_PRIVATE[@]}" download "${GO_PACKAGES[@]}")
  compgen -G "$dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" >/dev/null \
    || die "bookworm's kubernetes source is no longer $DEBIAN_UPSTREAM: $(ls "$dl")"
}

unpack_go() {
  local deb
  rm -rf "$WORK/go"
  for deb in "$WORK"/dl/golang-1.15-*.deb; do
    dpkg -x "$deb" "$WORK/go"
  done
  export GOROOT=$WORK/go/usr/lib/go-1.15
  export PATH=$GOROOT/bin:$PATH
  local version
  version=$(go version) || die "the unpacked Go does not run"
  [[ $version == "go version go1.15."* ]] || die "expected Go 1.15, got: $version"
  log "using $version from $GOROOT"
}

unpack_source() {
  local dsc
  dsc=$(compgen -G "$WORK/dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" | head -n 1)
  # Always from scratch: a tree half-built by an earlier failed run is not worth trusting.
  rm -rf "$WORK/src"
  log "unpacking $(basename "$dsc") with Debian's patches into $WORK/src"
  # dpkg-source checks the files' checksums against the .dsc (whose own hash apt checked
  # against the signed Sources index); it only warns that it lacks the uploader's key.
  dpkg-source -x "$dsc" "$WORK/src"
  if [ ! -d "$WORK/src/vendor" ] || [ ! -d "$WORK/src/cmd/kube-apiserver" ]; then
    die "$WORK/src is not a full kubernetes tree (no vendor/ or cmd/kube-apiserver)"
  fi
}

compile() {
  # The tarball has no .git: the version comes from this file, as kube's release tooling does.
  cat >"$WORK/version.env" <<EOF
KUBE_GIT_COMMIT='$KUBE_COMMIT'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  log "make WHAT=cmd/kube-apiserver (5 to 12 minutes on 2 cores)"
  local start=$SECONDS
  # GOPROXY=off: everything must come from vendor/ (Go 1.15 uses it by default as go.mod
  # says `go 1.15`; GOFLAGS stays empty because kube's scripts parse -tags out of it).
  # CGO_ENABLED=0: a static binary, and no C toolchain needed. HOME: Go and kube's scripts
  # write caches there; keep them in the work dir. The rest as upstream leaves it.
  (
    cd "$WORK/src"
    env -u GOFLAGS -u GOPATH -u GOBIN -u GO111MODULE \
      GOPROXY=off GOSUMDB=off CGO_ENABLED=0 \
      HOME="$WORK/home" KUBE_GIT_VERSION_FILE="$WORK/version.env" \
      make WHAT=cmd/kube-apiserver
  ) || die "make failed; the build tree is kept in $WORK/src"
  log "compiled in $((SECONDS - start))s"
}

install_binary() {
  local built=$WORK/src/_output/bin/kube-apiserver
  [ -x "$built" ] || die "make succeeded but $built is missing"
  local version
  version=$("$built" --version) || die "$built does not run"
  [ "$version" = "Kubernetes $KUBE_VERSION" ] || die "$built reports '$version', not $KUBE_VERSION"
  # Copy then rename, so a reader never sees a half-written binary.
  cp "$built" "$BINARY.tmp"
  mv -f "$BINARY.tmp" "$BINARY"
  log "installed $BINARY ($version)"
}

build() {
  if cached_binary_ok; then
    ensure_apt_packages etcd-server
    log "cached: $BINARY ($KUBE_VERSION)"
    return 0
  fi
  mkdir -p "$CACHE_DIR"
  # One build at a time per cache dir (e.g. a developer's and CI's run on the same machine).
  exec 9>"$CACHE_DIR/.lock"
  flock 9
  if cached_binary_ok; then
    ensure_apt_packages etcd-server
    log "built meanwhile by another run: $BINARY"
    return 0
  fi
  local start=$SECONDS
  ensure_apt_packages "${APT_PACKAGES[@]}"
  download
  unpack_go
  unpack_source
  compile
  install_binary
  # Only the binary is worth keeping: the tree, toolchain and Go cache are ~2 GB.
  rm -rf "$WORK"
  log "done in $((SECONDS - start))s"
}

main() {
  # Everything here is logging: send all of it, apt's and make's too, to stderr.
  exec 1>&2
  case "${1:-}" in
    build) build ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
