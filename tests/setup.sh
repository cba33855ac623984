#!/usr/bin/env bash
# Installs what the tests need beyond cargo, when it is missing: the curl and git binaries and
# Python with requests, PyJWT, boto3 and http-message-signatures (real clients and independent
# verifiers the integration tests drive; tests/env.rs fails without requests), iproute2's `ip` (tests/hostile.rs sets up interfaces in a network namespace of its
# own, when run as root) and promtool (CI checks the scraped metrics and the alert rules with it;
# optional). Debian/Ubuntu, as root or through sudo.
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v git >/dev/null 2>&1 || need+=(git)
# The python3 on PATH is the one the tests run; Debian's package provides requests for its own.
python3 -c "import requests" >/dev/null 2>&1 || need+=(python3 python3-requests)
# PyJWT (with cryptography for RS256) verifies GitHub App JWTs in tests/github_app.rs and judges
# the OIDC test issuer and tokens in tests/oidc.rs (RS256, ES256, EdDSA).
python3 -c "import jwt, cryptography" >/dev/null 2>&1 || need+=(python3-jwt python3-cryptography)
# boto3 (with botocore's signer) drives S3 and verifies SigV4 signatures in tests/sigv4.rs.
python3 -c "import boto3" >/dev/null 2>&1 || need+=(python3-boto3)
# nftables redirects a test user's connections to the transparent listener (tests/transparent.rs,
# inside its own network namespace, when run as root).
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
# `ip` lives in /sbin or /usr/sbin, which a non-root PATH may lack.
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
want_promtool=0
command -v promtool >/dev/null 2>&1 || want_promtool=1
want_pip=0
python3 -c "import http_message_signatures" >/dev/null 2>&1 || want_pip=1
if [ "${#need[@]}" -eq 0 ] && [ "$want_promtool" = 0 ] && [ "$want_pip" = 0 ]; then
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
if ! python3 -c "import requests" >/dev/null 2>&1; then
  # Another python3 ahead of Debian's on PATH (pyenv, a venv): the package did not reach it.
  echo "python3 on PATH ($(command -v python3)) cannot import requests: install it for that Python" >&2
  exit 1
fi
if ! python3 -c "import jwt, cryptography" >/dev/null 2>&1; then
  # As for requests: the python3 on PATH may not be Debian's; install PyJWT for it.
  python3 -m pip install -q "pyjwt[crypto]" ||
    { echo "python3 on PATH ($(command -v python3)) cannot import jwt: install pyjwt[crypto] for it" >&2; exit 1; }
fi
if ! python3 -c "import boto3" >/dev/null 2>&1; then
  python3 -m pip install -q boto3 ||
    { echo "python3 on PATH ($(command -v python3)) cannot import boto3: install boto3 for it" >&2; exit 1; }
fi
if ! python3 -c "import http_message_signatures" >/dev/null 2>&1; then
  # The RFC 9421 verifier of tests/signing.rs (not packaged by Debian).
  python3 -m pip install -q http-message-signatures ||
    python3 -m pip install -q --break-system-packages http-message-signatures ||
    { echo "python3 on PATH ($(command -v python3)) cannot import http_message_signatures: install it for that Python" >&2; exit 1; }
fi
