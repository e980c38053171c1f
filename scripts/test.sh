#!/usr/bin/env bash
# The test command: installs prerequisites (once), then runs every test,
# including the kernel and Consul integration tests (they need root).
set -euo pipefail
cd "$(dirname "$0")/.."
CONSUL_BIN=$(scripts/deps.sh | tail -n 1)
export CONSUL_BIN
go vet ./...
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt: not formatted: $unformatted" >&2; exit 1; fi
# -p 2: the kernel tests build many namespaces; two packages at a time is
# what a 2-core machine takes without timeouts.
go test -p 2 -count=1 -timeout 15m "$@" ./...
