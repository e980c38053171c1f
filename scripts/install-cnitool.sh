#!/usr/bin/env bash
# Puts cnitool (the CNI project's command-line runtime) where the CNI tests
# find it and prints its path. Only the tests that need it call this.
set -euo pipefail

version="${CNITOOL_VERSION:-v1.3.1}"
cache="${VXNET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vxnet}"
bin="$cache/cnitool-$version"

if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { echo "install-cnitool: go is required" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install-cnitool: installing cnitool $version (once)" >&2
GOBIN="$work" go install "github.com/containernetworking/cni/cnitool@$version" >&2
mv "$work/cnitool" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
