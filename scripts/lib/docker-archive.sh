# shellcheck shell=bash
# Writes images as `docker save` archives, which `ctr images import` (and `docker load`,
# `podman load`, `skopeo copy docker-archive:`) read, without a daemon or a registry.
# Shared by scripts/kube-node.sh (pause and workload images) and scripts/steer-image.sh.
# The caller has `set -Eeuo pipefail`, and `die` from scripts/lib/kube-build.sh.

# Usage: da_write OUT.tar REPO:TAG CONFIG_JSON LAYER.tar...
# CONFIG_JSON is the image config's "config" object (Entrypoint, Env, ...). Layers are
# uncompressed tars, base first; each is hard-linked (or copied) into the archive under
# its digest, so the archive names the same layer the same way in every image. The archive
# is written beside OUT and renamed into place, so a reader never sees half of one.
da_write() {
  local out=$1 ref=$2 config=$3
  shift 3
  [ $# -gt 0 ] || die "da_write: no layer for $ref"
  local dir layer sha diff_ids="" layers="" files=()
  dir=$(mktemp -d "$(dirname "$out")/.build.XXXXXX")
  for layer in "$@"; do
    sha=$(sha256sum "$layer" | cut -d' ' -f1)
    mkdir -p "$dir/$sha"
    ln "$layer" "$dir/$sha/layer.tar" 2>/dev/null || cp "$layer" "$dir/$sha/layer.tar"
    diff_ids+="${diff_ids:+,}\"sha256:$sha\""
    layers+="${layers:+,}\"$sha/layer.tar\""
    files+=("$sha")
  done
  printf '{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$config" "$diff_ids" >"$dir/config.json"
  local config_sha
  config_sha=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/$config_sha.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":[%s]}]' \
    "$config_sha" "$ref" "$layers" >"$dir/manifest.json"
  # A layer listed twice (the same content) is stored once.
  mapfile -t files < <(printf '%s\n' "${files[@]}" | sort -u)
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir" \
    -cf "$out.tmp" manifest.json "$config_sha.json" "${files[@]}"
  mv -f "$out.tmp" "$out"
  rm -rf "$dir"
}

# Usage: da_layer OUT.tar DIR [PATH...]: DIR's content (or only the PATHs below it) as a
# layer, sorted so that the same tree gives the same digest. Owners and mtimes are kept:
# Debian's and pip's .pyc files are checked against their sources' mtimes, and a layer
# that zeroed them would make every Python start recompile (in memory, on a read-only
# root: on every start). Reproducible layers (pause, workload) pass DA_FIXED_MTIME=1.
da_layer() {
  local out=$1 dir=$2
  shift 2
  local fixed=()
  [ -z "${DA_FIXED_MTIME:-}" ] || fixed=(--mtime=@0 --owner=0 --group=0)
  [ $# -gt 0 ] || set -- .
  tar --sort=name --numeric-owner "${fixed[@]}" -C "$dir" -cf "$out.tmp" "$@"
  mv -f "$out.tmp" "$out"
}
