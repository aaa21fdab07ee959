# shellcheck shell=bash
# Shared by scripts/kube-apiserver.sh and scripts/kube-node.sh: builds Kubernetes v1.20.2
# binaries from what Debian ships, into one cache that both scripts (and tests) read.
#
# No prebuilt Kubernetes binary or Go toolchain of the right age can be had here, only
# Debian's registry. So binaries are built from:
#   - the source: bookworm's `kubernetes` source package (1.20.5+really1.20.2), whose
#     upstream tarball is the full v1.20.2 tree, vendor/ included (so GOPROXY=off works);
#   - the compiler: Go 1.15 from bullseye (golang-1.15-go, golang-1.15-src), the Go that
#     Kubernetes 1.20 was released with (bookworm only has 1.19, untried with this tree); it
#     is unpacked with `dpkg -x` into a private dir, so nothing on the system changes.
# Both Debian indexes are fetched into a PRIVATE apt list dir, so the system's apt config
# and package lists stay exactly as they were (bookworm only, no deb-src).
#
# The caller sets KB_NAME (its name in log lines) before sourcing, and `set -Eeuo pipefail`.
# Binaries land flat in $KB_CACHE_DIR; the build tree in $KB_WORK is deleted by the caller
# after a successful build and kept after a failed one, with the downloads, for the next run.

readonly KUBE_VERSION=v1.20.2
# Debian's upstream version for the 1.20.2 tree (the 1.20.5 upload was reverted to 1.20.2).
readonly DEBIAN_UPSTREAM=1.20.5+really1.20.2
# The commit of tag v1.20.2, as `git archive` substituted it into hack/lib/version.sh.
readonly KUBE_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
readonly GO_PACKAGES=(golang-1.15-go golang-1.15-src)
# rsync: used by kube's build scripts to copy binaries out; dpkg-dev: dpkg-source, to unpack
# the source package with Debian's (security) patches.
readonly KB_BUILD_APT_PACKAGES=(rsync dpkg-dev)

readonly KB_CACHE_ROOT=${STEER_KUBE_CACHE:-/var/cache/steer/kube}
readonly KB_CACHE_DIR=$KB_CACHE_ROOT/$KUBE_VERSION
readonly KB_WORK=$KB_CACHE_DIR/work

log() { printf '%s: %s\n' "${KB_NAME:-kube}" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# A cached binary counts only if it runs and names the version: a truncated or foreign file
# in the cache is rebuilt rather than trusted. kubelet answers `Kubernetes v1.20.2` too.
kb_binary_ok() {
  local bin=$KB_CACHE_DIR/$1
  [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "Kubernetes $KUBE_VERSION" ]
}

kb_ensure_apt_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root, or apt-get install them"
  log "installing ${missing[*]}"
  apt-get update -q
  # Installing etcd-server or containerd does not start a daemon here (policy-rc.d / no
  # systemd); steer runs its own on its own ports and paths either way.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# One build at a time per cache dir (a developer's and CI's run on the same machine, or the
# apiserver and node scripts at once): both scripts share $KB_WORK. Holds fd 9 until exit.
kb_lock() {
  mkdir -p "$KB_CACHE_DIR"
  exec 9>"$KB_CACHE_DIR/.lock"
  flock 9
}

# Daemons started later would inherit fd 9, and with it the lock, for as long as they run.
kb_unlock() {
  exec 9>&-
}

# The first of this machine's apt source URIs (deb822 .sources or one-line .list files)
# that matches the extended regex $1, or $2: the build fetches from the same place as
# everything else.
kb_apt_uri() {
  local uri
  uri=$(
    {
      grep -hsE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources \
        | awk '{ for (i = 2; i <= NF; i++) print $i }'
      grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | sed -E 's/\[[^]]*\]//' | awk '{ print $2 }'
    } | grep -E "$1" | head -n 1 || true
  )
  echo "${uri:-$2}"
}

# The Debian mirror this machine already uses.
kb_debian_mirror() {
  kb_apt_uri '/debian/?$' http://deb.debian.org/debian
}

# apt options that point apt at the private list and state dir only. The binary caches are
# disabled so apt does not overwrite the system's pkgcache.bin with these lists.
KB_APT_PRIVATE=()
kb_setup_private_apt() {
  local mirror
  mirror=$(kb_debian_mirror)
  mkdir -p "$KB_WORK/apt/lists/partial"
  cat >"$KB_WORK/apt/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main
EOF
  KB_APT_PRIVATE=(
    -o "Dir::Etc::sourcelist=$KB_WORK/apt/sources.list"
    -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$KB_WORK/apt/lists"
    -o Dir::Cache::pkgcache=
    -o Dir::Cache::srcpkgcache=
    # Downloads land in a root-owned dir; without this apt warns it cannot sandbox as _apt.
    -o APT::Sandbox::User=root
  )
  log "private apt lists from $mirror (bookworm deb-src, bullseye deb)"
  apt-get "${KB_APT_PRIVATE[@]}" update -q
}

kb_download() {
  local dl=$KB_WORK/dl
  mkdir -p "$dl"
  if compgen -G "$dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" >/dev/null \
    && compgen -G "$dl/golang-1.15-go_*.deb" >/dev/null \
    && compgen -G "$dl/golang-1.15-src_*.deb" >/dev/null; then
    log "reusing downloads in $dl"
    return 0
  fi
  kb_setup_private_apt
  log "downloading the kubernetes source package and ${GO_PACKAGES[*]}"
  (cd "$dl" && apt-get "${KB_APT_PRIVATE[@]}" source --download-only kubernetes)
  (cd "$dl" && apt-get "${KB_APT_PRIVATE[@]}" download "${GO_PACKAGES[@]}")
  compgen -G "$dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" >/dev/null \
    || die "bookworm's kubernetes source is no longer $DEBIAN_UPSTREAM: $(ls "$dl")"
}

kb_unpack_go() {
  local deb
  rm -rf "$KB_WORK/go"
  for deb in "$KB_WORK"/dl/golang-1.15-*.deb; do
    dpkg -x "$deb" "$KB_WORK/go"
  done
  export GOROOT=$KB_WORK/go/usr/lib/go-1.15
  export PATH=$GOROOT/bin:$PATH
  local version
  version=$(go version) || die "the unpacked Go does not run"
  [[ $version == "go version go1.15."* ]] || die "expected Go 1.15, got: $version"
  log "using $version from $GOROOT"
}

kb_unpack_source() {
  local dsc
  dsc=$(compgen -G "$KB_WORK/dl/kubernetes_${DEBIAN_UPSTREAM}-*.dsc" | head -n 1)
  # Always from scratch: a tree half-built by an earlier failed run is not worth trusting.
  rm -rf "$KB_WORK/src"
  log "unpacking $(basename "$dsc") with Debian's patches into $KB_WORK/src"
  # dpkg-source checks the files' checksums against the .dsc (whose own hash apt checked
  # against the signed Sources index); it only warns that it lacks the uploader's key.
  dpkg-source -x "$dsc" "$KB_WORK/src"
  if [ ! -d "$KB_WORK/src/vendor" ] || [ ! -d "$KB_WORK/src/cmd/kube-apiserver" ]; then
    die "$KB_WORK/src is not a full kubernetes tree (no vendor/ or cmd/kube-apiserver)"
  fi
}

# Usage: kb_compile cmd/kube-apiserver [cmd/kubelet ...]. One make for all of them, so the
# packages they share are compiled once.
kb_compile() {
  # The tarball has no .git: the version comes from this file, as kube's release tooling does.
  cat >"$KB_WORK/version.env" <<EOF
KUBE_GIT_COMMIT='$KUBE_COMMIT'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  log "make WHAT=\"$*\" (on 2 cores: kube-apiserver alone 5 to 12 minutes, the node's four ~11)"
  local start=$SECONDS
  # GOPROXY=off: everything must come from vendor/ (Go 1.15 uses it by default as go.mod
  # says `go 1.15`; GOFLAGS stays empty because kube's scripts parse -tags out of it).
  # CGO_ENABLED=0: static binaries (kubelet included), and no C toolchain needed. HOME: Go
  # and kube's scripts write caches there; keep them in the work dir. The rest as upstream.
  (
    cd "$KB_WORK/src"
    env -u GOFLAGS -u GOPATH -u GOBIN -u GO111MODULE \
      GOPROXY=off GOSUMDB=off CGO_ENABLED=0 \
      HOME="$KB_WORK/home" KUBE_GIT_VERSION_FILE="$KB_WORK/version.env" \
      make WHAT="$*"
  ) || die "make failed; the build tree is kept in $KB_WORK/src"
  log "compiled in $((SECONDS - start))s"
}

# Usage: kb_install_binary kube-apiserver. Checks what make produced, then puts it in the cache.
kb_install_binary() {
  local name=$1
  local built=$KB_WORK/src/_output/bin/$name dest=$KB_CACHE_DIR/$name
  [ -x "$built" ] || die "make succeeded but $built is missing"
  local version
  version=$("$built" --version) || die "$built does not run"
  [ "$version" = "Kubernetes $KUBE_VERSION" ] || die "$built reports '$version', not $KUBE_VERSION"
  # Copy then rename, so a reader never sees a half-written binary.
  cp "$built" "$dest.tmp"
  mv -f "$dest.tmp" "$dest"
  log "installed $dest ($version)"
}

# Usage: kb_build_binaries kube-apiserver kubelet ... Builds those not cached yet, in one make,
# under the cache lock; returns at once when all are cached. Each name is a cmd/<name> target.
kb_build_binaries() {
  local name missing=()
  for name in "$@"; do
    kb_binary_ok "$name" || missing+=("$name")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "cached: $* ($KUBE_VERSION) in $KB_CACHE_DIR"
    return 0
  fi
  kb_lock
  # Another run may have built them while this one waited for the lock.
  missing=()
  for name in "$@"; do
    kb_binary_ok "$name" || missing+=("$name")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    kb_unlock
    log "built meanwhile by another run: $*"
    return 0
  fi
  local start=$SECONDS
  kb_ensure_apt_packages "${KB_BUILD_APT_PACKAGES[@]}"
  kb_download
  kb_unpack_go
  kb_unpack_source
  kb_compile "${missing[@]/#/cmd/}"
  for name in "${missing[@]}"; do
    kb_install_binary "$name"
  done
  # Only the binaries are worth keeping: the tree, toolchain and Go cache are ~2 GB.
  rm -rf "$KB_WORK"
  kb_unlock
  log "built ${missing[*]} in $((SECONDS - start))s"
}
