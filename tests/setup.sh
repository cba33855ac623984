#!/usr/bin/env bash
# Installs what the tests need beyond cargo, when it is missing: the curl and git binaries (real
# clients the integration tests drive), iproute2's `ip` (tests/hostile.rs sets up interfaces in a
# network namespace of its own, when run as root) and promtool (CI checks the scraped metrics and
# the alert rules with it; optional). Debian/Ubuntu, as root or through sudo.
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v git >/dev/null 2>&1 || need+=(git)
# `ip` lives in /sbin or /usr/sbin, which a non-root PATH may lack.
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
want_promtool=0
command -v promtool >/dev/null 2>&1 || want_promtool=1
if [ "${#need[@]}" -eq 0 ] && [ "$want_promtool" = 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if [ "${#need[@]}" -gt 0 ]; then
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >/dev/null
fi
if [ "$want_promtool" = 1 ]; then
  # promtool is a nice-to-have: a failed install of it must not fail the tests.
  $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null ||
    echo "promtool unavailable: its checks in .ci/run are skipped"
fi
