"""Verifies an OIDC ID token independently of the proxy's code (PyJWT), for tests/oidc.rs's
check that the test issuer and the test tokens are what they claim to be.

Usage: verify_oidc_jwt.py JWKS_FILE ISSUER AUDIENCE < token
Exit 0 and print "ok SUB" when the token is signed (RS256, ES256 or EdDSA) by the JWKS key its
`kid` names, `iss` is ISSUER, `aud` contains AUDIENCE and exp/nbf hold with 60 s leeway;
otherwise exit 1 and print "rejected: ERROR_CLASS: message".
"""
import json
import sys

import jwt

jwks = json.load(open(sys.argv[1]))
issuer, audience = sys.argv[2], sys.argv[3]
token = sys.stdin.read().strip()
try:
    header = jwt.get_unverified_header(token)
    keys = {k["kid"]: k for k in jwks["keys"]}
    if header.get("kid") not in keys:
        raise LookupError("no key for kid %r" % header.get("kid"))
    key = jwt.PyJWK(keys[header["kid"]])
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256", "ES256", "EdDSA"],
        audience=audience,
        issuer=issuer,
        leeway=60,
        options={"require": ["exp", "iss", "aud"]},
    )
except Exception as e:  # noqa: BLE001 - any failure is a rejection
    print("rejected: %s: %s" % (type(e).__name__, e))
    sys.exit(1)
print("ok %s" % claims.get("sub", ""))
