#!/usr/bin/env bash
# Puts a Consul server binary where tests and scripts find it and prints its path.
# Consul v1.14.11 is the newest MPL-2.0 release whose dependencies the Go module
# proxy serves. Its go.mod carries `replace` lines to sub-folders, which
# `go install` refuses, so we build it from a writable copy of the module.
set -euo pipefail

version="${CONSUL_VERSION:-v1.14.11}"
cache="${VXNET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vxnet}"
bin="$cache/consul-$version"

if [ -n "${CONSUL_BIN:-}" ]; then
  if [ -x "$CONSUL_BIN" ]; then echo "$CONSUL_BIN"; exit 0; fi
  echo "install-consul: CONSUL_BIN=$CONSUL_BIN is not an executable file" >&2
  exit 1
fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "install-consul: go is required to build Consul" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

log="$cache/consul-build.log"
echo "vxnet: building Consul $version once, about 4 minutes, log in $log" >&2
: >"$log"
fail() { echo "install-consul: $1; the end of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }
dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/hashicorp/consul@$version" 2>>"$log" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[ -d "$dir" ] || fail "module download failed"
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"
# Drop the replace directives (single lines and the block form).
sed -i -e '/^replace[[:space:]]*(/,/^)/d' -e '/^replace[[:space:]]/d' go.mod
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$work/consul" . >>"$log" 2>&1 || fail "build failed"
mv "$work/consul" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
