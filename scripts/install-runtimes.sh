#!/usr/bin/env bash
# Installs the container runtimes that the runtime tests drive (podman with
# its CNI backend, busybox-static for an image made offline) when missing,
# and nothing else: the demo and the other tests do not need them.
set -euo pipefail
missing=()
command -v podman >/dev/null || missing+=(podman)
# runc, not podman's default crun: crun refuses the hybrid cgroup layout
# of machines like this one.
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-runtimes: installing ${missing[*]} (apt-get; its output in /tmp/vxnet-apt.log)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/tmp/vxnet-apt.log 2>&1; then
    tail -n 20 /tmp/vxnet-apt.log >&2
    exit 1
  fi
fi
