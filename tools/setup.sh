#!/usr/bin/env bash
# Installs whatever the project needs and is missing; quick when everything is in place.
#   venv (pinned deps from pyproject.toml), FerretDB built from the Go module proxy,
#   the Pub/Sub emulator, Java, Prometheus/promtool/Alertmanager, docker-compose, Node and
#   its Pub/Sub client for tests/node.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] %s\033[0m\n' "$*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
EMULATOR=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
apt_updated=

apt_install() {
  command -v apt-get >/dev/null || die "missing $*, and no apt-get to install it: install $* yourself"
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# 1. Debian packages: Java for the emulator, Prometheus, promtool, Alertmanager, docker-compose,
#    Chromium (headless, for the status page's test and screenshot).
pkgs=()
command -v java >/dev/null || pkgs+=(default-jre-headless)
command -v prometheus >/dev/null && command -v promtool >/dev/null || pkgs+=(prometheus)
command -v prometheus-alertmanager >/dev/null || pkgs+=(prometheus-alertmanager)
command -v docker-compose >/dev/null || pkgs+=(docker-compose)
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || pkgs+=(golang-go)
command -v chromium >/dev/null || pkgs+=(chromium)  # the status page's browser test
command -v node >/dev/null && command -v npm >/dev/null || pkgs+=(nodejs npm)  # tests/node
[ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"

# 2. The Pub/Sub emulator ships with the Google Cloud CLI's emulator package.
if [ ! -x "$EMULATOR" ]; then
  if apt-cache show google-cloud-cli-pubsub-emulator >/dev/null 2>&1; then
    apt_install google-cloud-cli-pubsub-emulator
  fi
  [ -x "$EMULATOR" ] || die "Pub/Sub emulator not found at $EMULATOR: install the Debian package
  'google-cloud-cli-pubsub-emulator' from the Google Cloud CLI apt repository
  (or 'gcloud components install pubsub-emulator')."
fi

# 3. Python venv with the pinned dependencies; reinstalled only when pyproject.toml changes.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing Python dependencies into .venv (pinned in pyproject.toml)"
  .venv/bin/pip install --quiet --upgrade pip
  # Show what is being installed (progress), not pip's every line; fail if pip fails.
  set +o pipefail
  .venv/bin/pip install --progress-bar off -e '.[dev]' 2>&1 | tee .venv/install.log \
    | grep --line-buffered -E '^(Collecting|Successfully installed)'
  status=${PIPESTATUS[0]}
  set -o pipefail
  [ "$status" -eq 0 ] || die "pip install failed: see .venv/install.log"
  touch .venv/.installed
fi

# 4. FerretDB v1.24.2 (SQLite backend) through tools/ferretdb/main.go.
GO=$(command -v go || echo /usr/local/go/bin/go)
# Go needs a cache and module directory; CI environments may come without HOME.
export GOPATH="${GOPATH:-${HOME:-$PWD/.tools}/go}"
export GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-${HOME:-$PWD/.tools}/.cache}/go-build}"
if [ ! -x .tools/bin/ferretdb ] || [ tools/ferretdb/main.go -nt .tools/bin/ferretdb ] \
   || [ tools/ferretdb/go.mod -nt .tools/bin/ferretdb ]; then
  say "building FerretDB v1.24.2 from the Go module proxy (a few minutes the first time)"
  mkdir -p .tools/bin
  (cd tools/ferretdb && GOFLAGS=-mod=mod "$GO" build -o ../../.tools/bin/ferretdb .) \
    || die "FerretDB build failed"
fi
# 5. Helm v3.22.0 from the Go module proxy, to lint and render the chart in charts/.
if [ ! -x .tools/bin/helm ]; then
  say "building Helm v3.22.0 from the Go module proxy (a few minutes the first time)"
  mkdir -p .tools/bin
  GOBIN="$PWD/.tools/bin" GOFLAGS=-mod=mod "$GO" install helm.sh/helm/v3/cmd/helm@v3.22.0 \
    || die "Helm build failed"
fi
# 6. Node's official Pub/Sub client (pinned in tests/node/package-lock.json), for the test of
#    receipts relayed by a consumer in another language.
if [ ! -d tests/node/node_modules ] || [ tests/node/package-lock.json -nt tests/node/node_modules ]; then
  say "installing @google-cloud/pubsub for tests/node (npm ci)"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null \
    || die "npm ci in tests/node failed"
  touch tests/node/node_modules
fi
say "ready: .venv, .tools/bin/ferretdb, .tools/bin/helm, $(basename "$EMULATOR"), prometheus, promtool, alertmanager, chromium, tests/node"
