"""Verifies a GitHub App JWT independently of the proxy's code (PyJWT), for tests/github_app.rs.

Usage: verify_github_jwt.py PUBLIC_KEY_PEM APP_ID < token
Exit 0 and print "ok" when the token is RS256-signed by the key, its iss is APP_ID, iat is in
the past and exp - iat <= 660; otherwise exit 1 with the reason on stderr.
"""
import sys
import time

import jwt

public_key = open(sys.argv[1]).read()
app_id = sys.argv[2]
token = sys.stdin.read().strip()
try:
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "RS256":
        raise ValueError("alg is %r" % header.get("alg"))
    claims = jwt.decode(
        token,
        public_key,
        algorithms=["RS256"],
        options={"require": ["iss", "iat", "exp"]},
    )
    if claims["iss"] != app_id:
        raise ValueError("iss is %r" % claims["iss"])
    if claims["exp"] - claims["iat"] > 660:
        raise ValueError("exp - iat = %d" % (claims["exp"] - claims["iat"]))
    if claims["iat"] > time.time():
        raise ValueError("iat in the future")
except Exception as e:  # noqa: BLE001 - any failure is a rejection
    print("rejected: %s" % e, file=sys.stderr)
    sys.exit(1)
print("ok")
