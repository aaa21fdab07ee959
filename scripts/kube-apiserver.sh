#!/usr/bin/env bash
# Builds a real kube-apiserver for steer's Kubernetes integration tests (tests/k8s).
#
# No prebuilt Kubernetes binary, container runtime or Go toolchain of the right age can be
# had here, only Debian's registry. So the binary is built from Debian's kubernetes source
# package with bullseye's Go 1.15 (see scripts/lib/kube-build.sh, shared with
# scripts/kube-node.sh, which builds the node's binaries into the same cache); etcd is
# bookworm's etcd-server (3.4), installed as a normal package.
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

# shellcheck disable=SC2034 # read by scripts/lib/kube-build.sh
KB_NAME=kube-apiserver.sh
# shellcheck source=scripts/lib/kube-build.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/kube-build.sh"
readonly BINARY=$KB_CACHE_DIR/kube-apiserver

usage() {
  cat >&2 <<EOF
usage: $0 build
  Builds kube-apiserver $KUBE_VERSION (5 to 12 minutes) into $BINARY,
  or does nothing if it is already there. Set STEER_KUBE_CACHE to cache elsewhere.
EOF
}

build() {
  kb_build_binaries kube-apiserver
  # etcd-server: run by the tests next to the apiserver; a normal package.
  kb_ensure_apt_packages etcd-server
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
