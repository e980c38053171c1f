#!/usr/bin/env bash
# Installs the container runtimes that the runtime tests drive (Docker's
# daemon, podman with its CNI backend, busybox-static for an image made
# offline) and dig for the DNS tests when missing, and nothing else: the
# demo and the other tests do not need them. Debian's docker.io starts no
# daemon here (no systemd), and the tests start their own, one per
# simulated host.
set -euo pipefail
missing=()
command -v podman >/dev/null || missing+=(podman)
# runc, not podman's default crun: crun refuses the hybrid cgroup layout
# of machines like this one.
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
# Debian's 20.10 daemon; /usr/local/bin/docker may be a newer client.
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v dig >/dev/null || missing+=(dnsutils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-runtimes: installing ${missing[*]} (apt-get; its output in /tmp/vxnet-apt.log)" >&2
  export DEBIAN_FRONTEND=noninteractive
  # No service may start from the install: a machine-wide dockerd would
  # rewrite the machine's own iptables and routes.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    trap '[ -n "$made_policy" ] && rm -f "$policy"' EXIT
  fi
  if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/tmp/vxnet-apt.log 2>&1; then
    tail -n 20 /tmp/vxnet-apt.log >&2
    exit 1
  fi
fi
