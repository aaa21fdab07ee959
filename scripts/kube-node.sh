#!/usr/bin/env bash
# A real one-node Kubernetes v1.20.2 cluster for steer's cluster tests (issue 12): etcd,
# kube-apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy (iptables
# mode) and CNI (bridge, host-local, portmap), all from Debian's registry, and cluster DNS
# for Service names (scripts/lib/kube-dns.py on the node's address: Debian has no CoreDNS).
#
# Usage: scripts/kube-node.sh build|up|down|status|exec -- CMD...
#   build   Idempotent; 11 min measured once on 2 cores (kubelet is the long part), ~1 s after.
#           Into ${STEER_KUBE_CACHE:-/var/cache/steer/kube}/v1.20.2/, next to kube-apiserver:
#             kubelet kube-proxy kube-controller-manager kube-scheduler (and kube-apiserver if
#               missing), built from the same Debian source and Go 1.15, in one make
#               (scripts/lib/kube-build.sh);
#             node-root/: containerd, runc, CNI plugins, busybox-static and kubectl 1.20,
#               unpacked with `dpkg -x` (not installed: a system-wide containerd or kubectl
#               would change the machine for everyone, and the host's kubectl may be far newer
#               than the 1.20 apiserver supports);
#             images/: the pause and workload images as docker-archive tarballs, made by hand
#               (no registry can be reached).
#           etcd-server, iptables, conntrack, gcc, curl and openssl are apt-installed if
#           missing, as scripts/kube-apiserver.sh already does for etcd.
#   up [ARCHIVE...]
#           Builds if needed, then starts the node; prints the kubeconfig path as the LAST
#           line of stdout, all else goes to stderr. ~20 s once built (5 s of it is kubelet's
#           cAdvisor retrying a Docker that is not there). Fails if already up. ARCHIVEs
#           (docker-archive tarballs, such as steer's image) are imported into the node's
#           containerd in the background meanwhile; up returns once they are in.
#   down    Stops everything and removes all it created; safe when nothing is up.
#   status  Exit 0 if the node is up (and prints the kubeconfig path), 1 if not.
#   exec    Runs CMD inside the node (its network and mount namespaces), e.g.
#           `scripts/kube-node.sh exec -- ctr containers ls` or `... exec -- curl http://POD_IP:8080/`
#           (kubectl there is the 1.20 one, KUBECONFIG set).
#
# Isolation (nothing of the node lands in the host's namespaces, cgroups or rules):
#   - netns `steer-kube`: every daemon runs in it, so kubelet's, kube-proxy's and CNI's
#     iptables rules exist only there and vanish with it. A veth pair carries the node IP
#     (this kernel has no dummy driver); its host end makes the apiserver reachable from the
#     host at https://$NODE_IP:6443, which is what the printed kubeconfig uses. Inside, the
#     only routes are that link, the pod bridge and the Service CIDR; all else is unreachable.
#   - a mount namespace of its own, held by a `sleep` process and entered by every daemon:
#       a fresh sysfs (that of the node netns) with the host's cgroup tree bound in, and a
#         fresh bpffs, so BPF pins made in the node die with it;
#       copies of host-wide sysctl files bound over /proc/sys, because kubelet writes
#         vm.overcommit_memory, kernel.panic and friends on start;
#       dirs bound from the state dir over the paths that containerd, CNI and kubelet use
#         whatever their config says (/run/containerd, /run/netns, /var/lib/cni,
#         /var/lib/kubelet, /var/log/pods, /var/log/containers) and over steer's own node
#         paths (/run/steer, /etc/steer), so a node's agent never meets the host's lab. What
#         is written there stays in $STATE; a mount point missing on the host is made by up
#         and removed by down. Pod netns (containerd's cni-<uuid>) are thus not in the host's
#         `ip netns`; use `exec`, or nsenter into a pod process.
#   - cgroup subtree /steer-kube in every hierarchy: kubelet runs with --cgroup-root=/steer-kube
#     (cgroupfs driver; runc 1.1 in this hybrid layout also places containers under
#     /sys/fs/cgroup/unified/steer-kube/kubepods/...). The daemons join
#     /sys/fs/cgroup/unified/steer-kube/node (v2 only: their v1 cgroups stay as started), so
#     one write to cgroup.kill ends the daemons, shims and containers together.
# State: ${STEER_KUBE_STATE:-/var/lib/steer-kube} (logs in log/, certs, etcd data); removed by down.
set -Eeuo pipefail
trap 'log "error: exit $? at line $LINENO: $BASH_COMMAND (see above)"' ERR

# shellcheck disable=SC2034 # read by scripts/lib/kube-build.sh
KB_NAME=kube-node.sh
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPTS
# shellcheck source=scripts/lib/kube-build.sh
. "$SCRIPTS/lib/kube-build.sh"
# shellcheck source=scripts/lib/docker-archive.sh
. "$SCRIPTS/lib/docker-archive.sh"

readonly BINARIES=(kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler)
readonly NODE_PACKAGES=(containerd runc containernetworking-plugins busybox-static kubernetes-client)
# etcd-server: the cluster's store; iptables, conntrack: kube-proxy and portmap call them;
# gcc, libc6-dev: the static pause binary; curl, openssl: up's readiness checks and certs.
readonly HOST_PACKAGES=(etcd-server iptables conntrack gcc libc6-dev curl openssl)
readonly NODE_ROOT=$KB_CACHE_DIR/node-root
readonly IMAGES=$KB_CACHE_DIR/images
# Bumped when the image recipe below changes, so cached tarballs are rebuilt.
readonly IMAGE_RECIPE=2
readonly PAUSE_IMAGE=steer-kube.local/pause:3.2
# busybox-static: `httpd -f -p 8080 -h /www` by default; any applet by `command:`. Its
# `wget -T` segfaults: bound a client's time with `timeout` instead. Plus `peername`
# (kube-images/peername.c), which prints what getpeername() says of a connection.
readonly WORKLOAD_IMAGE=steer-kube.local/busybox:1.35

usage() {
  cat >&2 <<EOF
usage: $0 build|up [ARCHIVE...]|down|status|exec -- CMD...
  build   build and cache kubelet, kube-proxy, controller-manager, scheduler $KUBE_VERSION,
          the runtime and the images in $KB_CACHE_DIR (10 to 20 min once, ~1 s after)
  up      start the one-node cluster; the last line of stdout is the kubeconfig path;
          ARCHIVEs (docker-archive tarballs) are imported into its containerd meanwhile
  down    stop it and remove everything it created (safe when nothing is up)
  status  exit 0 and print the kubeconfig path if up, exit 1 if not
  exec    run CMD in the node's network and mount namespaces
Images: $PAUSE_IMAGE (sandbox), $WORKLOAD_IMAGE (busybox; serves /www on :8080);
use them with imagePullPolicy: Never.
EOF
}

# --- build -----------------------------------------------------------------------------

# The runtime is unpacked, never installed: see the header. `apt-get download` uses the
# system's own lists (bookworm, with its security updates) and changes nothing. A cached root
# is kept until NODE_PACKAGES changes; delete node-root/ to take Debian's newer uploads.
build_node_root() {
  local stamp=$NODE_ROOT/.steer-kube-packages
  if [ -f "$stamp" ] && [ "$(cut -d= -f1 "$stamp" | tr '\n' ' ')" = "${NODE_PACKAGES[*]} " ]; then
    log "cached: $NODE_ROOT ($(tr '\n' ' ' <"$stamp"))"
    return 0
  fi
  local tmp=$NODE_ROOT.tmp pkg deb
  rm -rf "$tmp"
  mkdir -p "$tmp/.debs"
  log "downloading ${NODE_PACKAGES[*]}"
  if ! (cd "$tmp/.debs" && apt-get -o APT::Sandbox::User=root download -q "${NODE_PACKAGES[@]}"); then
    # Lists older than the archive name files that are gone; refresh once and retry.
    apt-get update -q
    (cd "$tmp/.debs" && apt-get -o APT::Sandbox::User=root download -q "${NODE_PACKAGES[@]}")
  fi
  : >"$tmp/.steer-kube-packages.tmp"
  for pkg in "${NODE_PACKAGES[@]}"; do
    deb=$(compgen -G "$tmp/.debs/${pkg}_*.deb" | head -n 1) || die "apt did not fetch $pkg"
    dpkg -x "$deb" "$tmp"
    printf '%s=%s\n' "$pkg" "$(dpkg-deb -f "$deb" Version)" >>"$tmp/.steer-kube-packages.tmp"
  done
  rm -rf "$tmp/.debs"
  local want
  for want in usr/bin/containerd usr/bin/ctr usr/bin/containerd-shim-runc-v2 usr/sbin/runc \
    usr/lib/cni/bridge usr/lib/cni/host-local usr/lib/cni/portmap usr/lib/cni/loopback \
    bin/busybox usr/bin/kubectl; do
    [ -x "$tmp/$want" ] || die "the unpacked runtime has no $want"
  done
  mv "$tmp/.steer-kube-packages.tmp" "$tmp/.steer-kube-packages"
  rm -rf "$NODE_ROOT"
  mv "$tmp" "$NODE_ROOT"
  log "unpacked the runtime into $NODE_ROOT"
}

# Usage: docker_archive OUT.tar REPO:TAG ROOTFS_DIR CONFIG_JSON_FRAGMENT
# One layer, made reproducible (sorted, fixed mtime and owner), so the same inputs give the
# same image ID; the archive format is scripts/lib/docker-archive.sh's.
docker_archive() {
  local out=$1 ref=$2 rootfs=$3 config=$4
  local dir
  dir=$(mktemp -d "$IMAGES/.build.XXXXXX")
  DA_FIXED_MTIME=1 da_layer "$dir/layer.tar" "$rootfs"
  da_write "$out" "$ref" "$config" "$dir/layer.tar"
  rm -rf "$dir"
}

build_images() {
  local stamp_want
  stamp_want="recipe=$IMAGE_RECIPE $(cd "$SCRIPTS/kube-images" && sha256sum pause.c peername.c | cut -c1-16 | tr '\n' ' ')$(grep busybox "$NODE_ROOT/.steer-kube-packages")"
  if [ -f "$IMAGES/pause.tar" ] && [ -f "$IMAGES/workload.tar" ] \
    && [ "$(cat "$IMAGES/.stamp" 2>/dev/null)" = "$stamp_want" ]; then
    log "cached: $IMAGES ($PAUSE_IMAGE, $WORKLOAD_IMAGE)"
    return 0
  fi
  mkdir -p "$IMAGES"
  # What a failed run left half-made.
  rm -rf "$IMAGES"/.rootfs.* "$IMAGES"/.build.*
  local root
  root=$(mktemp -d "$IMAGES/.rootfs.XXXXXX")
  mkdir -p "$root/pause" "$root/workload"

  gcc -static -O2 -Wall -Wextra -Werror -o "$root/pause/pause" "$SCRIPTS/kube-images/pause.c"
  strip "$root/pause/pause"
  docker_archive "$IMAGES/pause.tar" "$PAUSE_IMAGE" "$root/pause" '{"Entrypoint":["/pause"]}'

  local w=$root/workload applet
  mkdir -p "$w/bin" "$w/sbin" "$w/usr/bin" "$w/usr/sbin" "$w/etc" "$w/www" "$w/tmp"
  chmod 1777 "$w/tmp"
  cp "$NODE_ROOT/bin/busybox" "$w/bin/busybox"
  gcc -static -O2 -Wall -Wextra -Werror -o "$w/bin/peername" "$SCRIPTS/kube-images/peername.c"
  strip "$w/bin/peername"
  # Every applet as a symlink, as busybox's own installer lays them out.
  while read -r applet; do
    [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$w/$applet"
  done < <("$w/bin/busybox" --list-full)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$w/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$w/etc/group"
  printf 'steer-kube workload\n' >"$w/www/index.html"
  docker_archive "$IMAGES/workload.tar" "$WORKLOAD_IMAGE" "$w" \
    '{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["httpd","-f","-v","-p","8080","-h","/www"],"ExposedPorts":{"8080/tcp":{}}}'
  rm -rf "$root"
  printf '%s' "$stamp_want" >"$IMAGES/.stamp"
  log "built $IMAGES/pause.tar ($PAUSE_IMAGE) and $IMAGES/workload.tar ($WORKLOAD_IMAGE)"
}

build() {
  local start=$SECONDS
  # kube-apiserver too: one make for all five when starting from nothing; cached otherwise.
  kb_build_binaries "${BINARIES[@]}"
  kb_ensure_apt_packages "${HOST_PACKAGES[@]}"
  kb_lock
  build_node_root
  build_images
  kb_unlock
  log "build ready in $((SECONDS - start))s"
}

# --- the node ---------------------------------------------------------------------------

readonly STATE=${STEER_KUBE_STATE:-/var/lib/steer-kube}
readonly NETNS=steer-kube
readonly VETH_HOST=steer-kube-h
# The node's own end is renamed eth0 inside its netns, as on a real node.
readonly VETH_NODE_TMP=steer-kube-n
readonly HOST_IP=10.87.0.1
readonly NODE_IP=10.87.0.2
readonly NODE_NAME=steer-kube-node
# Far from the steer lab's 10.244.0.0/16; they only exist inside the node netns anyway.
readonly CLUSTER_CIDR=10.88.0.0/16
readonly POD_SUBNET=10.88.0.0/24
readonly POD_GATEWAY=10.88.0.1
readonly SERVICE_CIDR=10.89.0.0/16
readonly SERVICE_APISERVER_IP=10.89.0.1
readonly CGROUP_NAME=steer-kube
readonly CG2=/sys/fs/cgroup/unified/$CGROUP_NAME
# What the daemons write whatever their config says (see the header); each is bound from
# $STATE/host/<path> in the node's mount namespace.
readonly OVERLAID=(/run/containerd /run/netns /run/steer /var/lib/cni /var/lib/kubelet
  /var/log/pods /var/log/containers /etc/steer)
# Host-wide sysctls kubelet sets on start (pkg/kubelet/cm setupNode); the node gets copies.
readonly SYSCTL_COPIES=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
readonly KUBECONFIG_ADMIN=$STATE/admin.kubeconfig
readonly CONTAINERD_SOCK=/run/containerd/containerd.sock
readonly NODE_PATH=$NODE_ROOT/usr/sbin:$NODE_ROOT/usr/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The PID of the process that holds the node's mount namespace, if it is alive. Checked by
# its cgroup, so a PID reused after a reboot is not taken for it.
holder_pid() {
  local pid
  pid=$(cat "$STATE/pids/holder" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -s "$STATE/pids/holder.ok" ] \
    && grep -qx "0::/$CGROUP_NAME/node" "/proc/$pid/cgroup" 2>/dev/null || return 1
  echo "$pid"
}

is_up() {
  [ -f "$STATE/up" ] && holder_pid >/dev/null
}

# Runs "$@" in the node's namespaces, as a member of the node's cgroup (so down's cgroup.kill
# reaches it and all it forks). Logs to $STATE/log/NAME.log; its PID goes to $STATE/pids/NAME.
start_daemon() {
  local name=$1
  shift
  local holder
  holder=$(holder_pid) || die "the node's mount namespace holder is gone"
  (
    echo "$BASHPID" >"$CG2/node/cgroup.procs"
    exec 9>&- # the build lock's fd, should a caller still hold it
    # setsid: off the caller's session and terminal, so its Ctrl-C or exit spares the node.
    # stdout too to the log: a daemon holding up's stdout would hang `$(kube-node.sh up)`.
    exec setsid nsenter --target "$holder" --mount --net --pid -- \
      env -i PATH="$NODE_PATH" HOME=/root "$@" </dev/null >>"$STATE/log/$name.log" 2>&1
  ) &
  echo "$!" >"$STATE/pids/$name"
}

# Usage: wait_for WHAT SECONDS LOGNAME CMD...; CMD is retried every 0.2 s.
wait_for() {
  local what=$1 timeout=$2 logname=$3
  shift 3
  local deadline=$((SECONDS + timeout)) pid
  until "$@" >/dev/null 2>&1; do
    pid=$(cat "$STATE/pids/$logname" 2>/dev/null || true)
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      tail -n 25 "$STATE/log/$logname.log" >&2 || true
      die "$logname exited while waiting for $what; above: the end of $STATE/log/$logname.log"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 25 "$STATE/log/$logname.log" >&2 || true
      die "timed out after ${timeout}s waiting for $what; above: the end of $STATE/log/$logname.log"
    fi
    sleep 0.2
  done
}

# Usage: make_cert NAME CN [O] [SANS]: an EC key and a cert signed by the node's CA. EC
# because P-256 keys are generated in milliseconds, and up is meant to take seconds.
make_cert() {
  local name=$1 cn=$2 org=${3:-} sans=${4:-} pki=$STATE/pki
  local subj="/CN=$cn"
  [ -z "$org" ] || subj="/O=$org$subj"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
  {
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n'
    printf 'extendedKeyUsage=serverAuth,clientAuth\n'
    [ -z "$sans" ] || printf 'subjectAltName=%s\n' "$sans"
  } >"$pki/$name.ext"
  openssl req -new -key "$pki/$name.key" -subj "$subj" 2>/dev/null \
    | openssl x509 -req -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 365 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

# Usage: write_kubeconfig FILE CERTNAME
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $NETNS
  cluster:
    certificate-authority: $STATE/pki/ca.crt
    server: https://$NODE_IP:6443
users:
- name: $2
  user:
    client-certificate: $STATE/pki/$2.crt
    client-key: $STATE/pki/$2.key
contexts:
- name: $NETNS
  context: {cluster: $NETNS, user: $2}
current-context: $NETNS
EOF
}

make_pki() {
  local pki=$STATE/pki
  mkdir -p "$pki"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=steer-kube-ca" -days 365 -sha256 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$pki/ca.crt" 2>/dev/null
  make_cert apiserver kube-apiserver "" \
    "IP:$NODE_IP,IP:$SERVICE_APISERVER_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  make_cert admin steer-kube-admin system:masters
  make_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  make_cert kubelet "system:node:$NODE_NAME" system:nodes
  make_cert controller-manager system:kube-controller-manager
  make_cert scheduler system:kube-scheduler
  make_cert kube-proxy system:kube-proxy
  # The service account signing key stays RSA: the tokens' RS256 is what every client expects.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  write_kubeconfig "$KUBECONFIG_ADMIN" admin
  local who
  for who in kubelet controller-manager scheduler kube-proxy; do
    write_kubeconfig "$STATE/$who.kubeconfig" "$who"
  done
}

write_configs() {
  mkdir -p "$STATE/etc" "$STATE/cni/net.d" "$STATE/containerd" "$STATE/bin"
  printf '#!/bin/sh\nexec /usr/bin/python3 %s %s "$@"\n' "$SCRIPTS/lib/runc-caps.py" \
    "$NODE_ROOT/usr/sbin/runc" >"$STATE/bin/runc"
  chmod 0755 "$STATE/bin/runc"
  cat >"$STATE/etc/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
# opt would create /opt/containerd; the others are of no use here and only slow the start.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
# The default socket path, in the node's own /run/containerd: what cAdvisor in kubelet dials
# (it waits seconds for a missing one), and what ctr and DaemonSets inside the node expect.
# From the host it is $STATE/host/run/containerd/containerd.sock.
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower a container's oom_score_adj below
  # its own (kubelet asks -998 for the sandbox) and fails with "can't get final child's PID
  # from pipe: EOF". This clamps the request to containerd's own value instead.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # scripts/lib/runc-caps.py before the real runc: it drops the capabilities that
        # root here lacks (CAP_SYS_RESOURCE) from what a container asks for, or runc fails
        # with "unable to apply caps: operation not permitted" (steer's agent asks for it).
        BinaryName = "$STATE/bin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$NODE_ROOT/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  cat >"$STATE/cni/net.d/10-steer-kube.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "steer-kube",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$STATE/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_NAME
cgroupsPerQOS: true
clusterDomain: cluster.local
# scripts/lib/kube-dns.py, on the node's address: what pods (and host-network pods with
# ClusterFirstWithHostNet, such as steer's Envoy) resolve Service names with.
clusterDNS: [$NODE_IP]
resolvConf: /etc/resolv.conf
# The imported images cannot be pulled again: never collect them, and do not taint the node
# for a busy developer disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
failSwapOn: false
# The default 10 s puts ~10 s between registering and Ready; tests wait for Ready.
nodeStatusUpdateFrequency: 2s
EOF
  cat >"$STATE/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $CLUSTER_CIDR
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# 0: leave nf_conntrack_max and the module's hashsize alone; both are host-wide.
conntrack: {maxPerCore: 0, min: 0}
EOF
}

# The node's cgroup in every hierarchy: kubelet refuses a --cgroup-root that is missing in
# any of them. cpuset needs its cpus and mems filled before anything can join below.
make_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    mountpoint -q "$h" || continue
    mkdir -p "$h/$CGROUP_NAME"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" >"$h/$CGROUP_NAME/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h/$CGROUP_NAME/cpuset.mems"
    fi
  done
  mkdir -p "$CG2/node"
}

make_netns() {
  ip netns add "$NETNS"
  ip link add "$VETH_HOST" type veth peer name "$VETH_NODE_TMP"
  ip link set "$VETH_NODE_TMP" netns "$NETNS"
  ip addr add "$HOST_IP/24" dev "$VETH_HOST"
  ip link set "$VETH_HOST" up
  ip -n "$NETNS" link set "$VETH_NODE_TMP" name eth0
  ip -n "$NETNS" addr add "$NODE_IP/24" dev eth0
  ip -n "$NETNS" link set eth0 up
  ip -n "$NETNS" link set lo up
  # Service IPs must be routable before kube-proxy's OUTPUT DNAT can rewrite them (the
  # apiserver calls webhooks through a Service); a real node has its default route for that.
  # Anything else fails at once instead: nothing leaves through the host, and kubelet's and
  # cAdvisor's cloud probes (169.254.169.254, metadata DNS) give up in no time rather than
  # after seconds of timeouts.
  ip -n "$NETNS" route add "$SERVICE_CIDR" via "$HOST_IP"
  ip -n "$NETNS" route add unreachable default
  # Pod to Service to a pod on the same bridge: the reply must cross iptables to be
  # un-DNATed. Per netns, so the host's value is untouched.
  ip netns exec "$NETNS" sh -c 'echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables'
  ip netns exec "$NETNS" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
}

# Runs inside the node's fresh mount namespace (and netns), as the holder: sets up the
# mounts, then sleeps forever; the namespace lives as long as any process in it.
node_init() {
  # The host's cgroup tree, kept across the fresh sysfs below.
  mkdir -p "$STATE/mnt/cgroup"
  mount --rbind /sys/fs/cgroup "$STATE/mnt/cgroup"
  # sysfs shows the netns of whoever mounts it: /sys/class/net is then the node's.
  mount -t sysfs steer-kube-sysfs /sys
  mount --move "$STATE/mnt/cgroup" /sys/fs/cgroup
  mount -t bpf steer-kube-bpf /sys/fs/bpf
  mount -t tracefs steer-kube-tracefs /sys/kernel/tracing 2>/dev/null || true
  mount -t debugfs steer-kube-debugfs /sys/kernel/debug 2>/dev/null || true
  local path flat
  for path in "${SYSCTL_COPIES[@]}"; do
    [ -f "/proc/sys/$path" ] || continue
    flat=${path//\//.}
    cat "/proc/sys/$path" >"$STATE/sysctl/$flat"
    mount --bind "$STATE/sysctl/$flat" "/proc/sys/$path"
  done
  for path in "${OVERLAID[@]}"; do
    mkdir -p "$STATE/host$path"
    mount --bind "$STATE/host$path" "$path"
  done
  # As systemd makes them on a real node: a DaemonSet's HostToContainer mounts (steer's
  # /sys/fs/bpf, /run/netns) need a shared or slave source. Shared here means shared among
  # the node and its containers; the host still sees nothing (all is a slave of it).
  mount --make-rshared /
  echo 1 >"$STATE/pids/holder.ok"
  exec sleep infinity
}

# Records each OVERLAID mount point that up has to create on the host, topmost first, so
# down removes exactly those.
make_mountpoints() {
  local path top
  : >"$STATE/created-dirs"
  for path in "${OVERLAID[@]}"; do
    [ -d "$path" ] && continue
    top=$path
    while [ ! -e "$(dirname "$top")" ]; do top=$(dirname "$top"); done
    mkdir -p "$path"
    echo "$top" >>"$STATE/created-dirs"
  done
}

start_holder() {
  (
    echo "$BASHPID" >"$CG2/node/cgroup.procs"
    exec 9>&-
    # --propagation slave: the host's later mounts still show inside, none made inside
    # leaks out, and they all vanish with the last process of the node.
    # --pid: the node's own PID namespace, whose PID 1 (the holder) is in the node's netns
    # as a real node's init is. hostPID pods (steer's agent) see the node's processes, and
    # /proc/1 there is the node's, not this machine's (whose init here is not even
    # readable by root: it alone holds CAP_SYS_RESOURCE).
    exec setsid nsenter --net="/run/netns/$NETNS" -- \
      unshare --mount --pid --fork --mount-proc --propagation slave -- \
      bash "$SCRIPTS/kube-node.sh" _node-init </dev/null >>"$STATE/log/holder.log" 2>&1
  ) &
  local unshare=$! deadline=$((SECONDS + 10))
  until [ -s "$STATE/pids/holder.ok" ]; do
    if ! kill -0 "$unshare" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$STATE/log/holder.log" >&2
      die "the node's mount namespace was not set up"
    fi
    sleep 0.05
  done
  # The holder is unshare's child (PID 1 inside); unshare itself is outside the PID namespace.
  local holder
  holder=$(cat "/proc/$unshare/task/$unshare/children")
  echo "${holder%% *}" >"$STATE/pids/holder"
}

node_exec() {
  local holder
  holder=$(holder_pid) || die "the node is not up"
  exec nsenter --target "$holder" --mount --net --pid -- \
    env PATH="$NODE_PATH" KUBECONFIG="$KUBECONFIG_ADMIN" CONTAINERD_NAMESPACE=k8s.io "$@"
}

# shellcheck disable=SC2317 # called through wait_for
apiserver_ready() {
  curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" \
    --key "$STATE/pki/admin.key" "https://$NODE_IP:6443/readyz"
}

# shellcheck disable=SC2317 # called through wait_for
kubectl_node() {
  "$NODE_ROOT/usr/bin/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"
}

# shellcheck disable=SC2317 # called through wait_for
node_ready() {
  [ "$(kubectl_node get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# Usage: up [ARCHIVE...]: the ARCHIVEs (docker-archive tarballs, e.g. steer's image from
# scripts/steer-image.sh build) are imported into the node's containerd while the control
# plane and kubelet start, rather than after: up returns once they are in.
up() {
  local archive
  for archive in "$@"; do
    [ -f "$archive" ] || die "no image archive $archive"
  done
  if is_up; then
    die "already up (kubeconfig $KUBECONFIG_ADMIN); run $0 down first"
  fi
  build >&2
  local start=$SECONDS
  # Leftovers of a crashed run would make the steps below fail half-way.
  down_quiet
  mkdir -p "$STATE"/{log,pids,sysctl,etcd}
  trap 'up_failed' EXIT
  make_mountpoints
  make_cgroups
  make_netns
  make_pki
  write_configs
  start_holder
  local b=$KB_CACHE_DIR
  start_daemon etcd etcd --name "$NETNS" --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NETNS=http://127.0.0.1:2380"
  start_daemon containerd containerd --config "$STATE/etc/containerd.toml"
  local pki=$STATE/pki
  start_daemon kube-apiserver "$b/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$NODE_IP" --bind-address=0.0.0.0 --secure-port=6443 \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-signing-key-file="$pki/sa.key" --service-account-key-file="$pki/sa.pub" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true
  wait_for "containerd's socket" 20 containerd test -S "$STATE/host$CONTAINERD_SOCK"
  local image
  for image in pause workload; do
    nsenter --target "$(holder_pid)" --mount --net -- \
      "$NODE_ROOT/usr/bin/ctr" --address "$CONTAINERD_SOCK" -n k8s.io \
      images import "$IMAGES/$image.tar" >>"$STATE/log/images.log" 2>&1 \
      || {
        tail -n 20 "$STATE/log/images.log" >&2
        die "ctr could not import $IMAGES/$image.tar"
      }
  done
  local extra_pid=
  if [ $# -gt 0 ]; then
    (
      for archive in "$@"; do
        nsenter --target "$(holder_pid)" --mount --net -- \
          "$NODE_ROOT/usr/bin/ctr" --address "$CONTAINERD_SOCK" -n k8s.io \
          images import "$archive" || exit 1
      done
    ) >>"$STATE/log/images.log" 2>&1 &
    extra_pid=$!
  fi
  wait_for "the apiserver's /readyz" 60 kube-apiserver apiserver_ready
  # With the admin's certificate: the bootstrap ClusterRole system:kube-dns (list and watch
  # Services) is bound to a ServiceAccount, which a process outside a pod cannot be.
  start_daemon kube-dns /usr/bin/python3 "$SCRIPTS/lib/kube-dns.py" --listen "$NODE_IP" \
    --server "https://$NODE_IP:6443" --ca "$pki/ca.crt" --cert "$pki/admin.crt" \
    --key "$pki/admin.key"
  start_daemon kube-controller-manager "$b/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key"
  start_daemon kube-scheduler "$b/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0
  start_daemon kubelet "$b/kubelet" --config="$STATE/etc/kubelet.yaml" \
    --kubeconfig="$STATE/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CONTAINERD_SOCK" \
    --node-ip="$NODE_IP" --hostname-override="$NODE_NAME"
  start_daemon kube-proxy "$b/kube-proxy" --config="$STATE/etc/kube-proxy.yaml"
  wait_for "node $NODE_NAME Ready" 60 kubelet node_ready
  if [ -n "$extra_pid" ] && ! wait "$extra_pid"; then
    tail -n 20 "$STATE/log/images.log" >&2
    die "ctr could not import $*"
  fi
  # Pods are refused until the controller-manager has made the namespace's service account.
  wait_for "the default service account" 30 kube-controller-manager \
    kubectl_node -n default get serviceaccount default
  trap - EXIT
  date +%s >"$STATE/up"
  log "up in $((SECONDS - start))s: node $NODE_NAME at $NODE_IP (pods $POD_SUBNET, services $SERVICE_CIDR)"
  log "kubectl 1.20: $NODE_ROOT/usr/bin/kubectl; logs: $STATE/log; images: $PAUSE_IMAGE, $WORKLOAD_IMAGE"
  echo "$KUBECONFIG_ADMIN"
}

# shellcheck disable=SC2317 # the EXIT trap of up
up_failed() {
  local rc=$?
  [ "$rc" -ne 0 ] || return 0
  if [ -n "${STEER_KUBE_KEEP:-}" ]; then
    log "up failed; left as it is for inspection (STEER_KUBE_KEEP): logs in $STATE/log; run $0 down"
  else
    log "up failed; cleaning up (set STEER_KUBE_KEEP=1 to keep it for inspection)"
    down_quiet || true
  fi
  exit "$rc"
}

# --- down --------------------------------------------------------------------------------

# Every process of the node is in $CG2 (daemons, shims, containers); one that escaped to
# the v1 cgroups only (a container runc failed to place in v2) is killed from there.
kill_node_processes() {
  local pids all=" " pid deadline=$((SECONDS + 15))
  if [ -d "$CG2" ]; then
    all+=$({ find "$CG2" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | tr '\n' ' ')
    echo 1 >"$CG2/cgroup.kill"
  fi
  while :; do
    pids=$({ find /sys/fs/cgroup/*/"$CGROUP_NAME" -name cgroup.procs -exec cat {} + 2>/dev/null \
      || true; } | sort -u | tr '\n' ' ')
    [ -n "${pids// /}" ] || break
    all+=" $pids"
    [ "$SECONDS" -lt "$deadline" ] || die "processes still in the node's cgroups: $pids"
    # shellcheck disable=SC2086 # a list of PIDs
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  # The daemons were orphaned when up exited, so their zombies are init's to reap; wait for
  # that, so that no trace of the node is left when down returns.
  for pid in $all; do
    while [ -e "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    [ ! -e "/proc/$pid" ] || log "warning: process $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) not reaped yet"
  done
}

remove_cgroups() {
  local dir deadline=$((SECONDS + 10))
  for dir in /sys/fs/cgroup/*/"$CGROUP_NAME"; do
    [ -d "$dir" ] || continue
    # Depth first; a cgroup whose last task just died can be busy for a moment.
    until find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d "$dir" ]; do
      [ "$SECONDS" -lt "$deadline" ] || die "cannot remove cgroup $dir"
      sleep 0.1
    done
  done
}

netns_exists() {
  ip netns list | grep -qE "^$NETNS( |\$)"
}

down_quiet() {
  kill_node_processes
  remove_cgroups
  if netns_exists; then
    ip netns delete "$NETNS"
  fi
  # Its peer went with the netns; this is for a run that died between the two steps.
  if ip link show "$VETH_HOST" >/dev/null 2>&1; then
    ip link delete "$VETH_HOST"
  fi
  # Nothing is mounted from the host's side; this guards rm -rf from a future mistake.
  local mnt
  while read -r mnt; do
    umount -l "$mnt"
  done < <(awk -v s="$STATE" '$5 == s || index($5, s "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  if [ -f "$STATE/created-dirs" ]; then
    local dir
    while read -r dir; do
      # Empty: all the node wrote there went to the bound dir in $STATE.
      find "$dir" -depth -type d -empty -delete 2>/dev/null || true
    done <"$STATE/created-dirs"
  fi
  rm -rf "$STATE"
}

down() {
  local was=
  [ -d "$STATE" ] || [ -d "$CG2" ] || netns_exists || was=nothing
  down_quiet
  if [ -n "$was" ]; then
    log "down: nothing was up"
  else
    log "down: stopped and removed $NETNS (netns, cgroups, $STATE)"
  fi
}

status() {
  if is_up; then
    log "up since $(date -d "@$(cat "$STATE/up")"); node $NODE_NAME at $NODE_IP"
    echo "$KUBECONFIG_ADMIN"
  else
    log "down"
    return 1
  fi
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case "$cmd" in
    build) build >&2 ;;
    up) up "$@" ;;
    down) down ;;
    status) status || exit 1 ;;
    exec)
      [ "${1:-}" != -- ] || shift
      [ $# -gt 0 ] || die "usage: $0 exec -- CMD..."
      node_exec "$@"
      ;;
    _node-init) node_init ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
exit
