"""A receiver that verifies RFC 9421 signatures independently of the proxy, for tests/signing.rs.

Signatures are checked with the `http-message-signatures` package against the proxy's public key
(SPKI PEM, as /signature/public-key serves it); Content-Digest with hashlib.

Server:  rfc9421_server.py PUBLIC_KEY_PEM [CERT_PEM KEY_PEM]
         prints its port, then one JSON line per request: {"verified", "why", "components",
         "client", "request": {method, authority, path, headers, body_b64}}; answers 200 when
         verified, 401 otherwise.
Check:   rfc9421_server.py PUBLIC_KEY_PEM --verify < request.json  (a "request" object as above)
         prints {"verified", "why"}.
"""
import base64
import hashlib
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms

PUBLIC_KEY_PATH = sys.argv[1]


class Resolver(HTTPSignatureKeyResolver):
    # Read at each verification: the test writes the file once the proxy has published its key.
    def resolve_public_key(self, key_id):
        if key_id != "portcullis-test":
            raise ValueError("unknown keyid %r" % key_id)
        return open(PUBLIC_KEY_PATH, "rb").read()


VERIFIER = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=Resolver())


def verify(req):
    """(verified, why, covered components) for a request description."""
    body = base64.b64decode(req["body_b64"])
    headers = {k: v for k, v in req["headers"].items()}
    url = "http://%s%s" % (req["authority"], req["path"])
    prepared = requests.Request(req["method"], url, headers=headers, data=body or None).prepare()
    # prepare() may add Content-Length; the signature does not cover it.
    try:
        results = VERIFIER.verify(prepared)
    except Exception as e:  # noqa: BLE001 - any failure is a rejection
        return False, "signature: %s" % e, []
    result = results[0]
    if result.label != "portcullis":
        return False, "label %s" % result.label, []
    covered = list(result.covered_components.keys())
    digest = headers.get("content-digest")
    if body:
        want = "sha-256=:%s:" % base64.b64encode(hashlib.sha256(body).digest()).decode()
        if digest != want:
            return False, "content-digest does not match the body", covered
        if '"content-digest"' not in covered:
            return False, "content-digest not signed", covered
    return True, "", covered


if len(sys.argv) > 2 and sys.argv[2] == "--verify":
    ok, why, _ = verify(json.load(sys.stdin))
    print(json.dumps({"verified": ok, "why": why}))
    sys.exit(0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = {
            "method": self.command,
            "authority": self.headers.get("Host", ""),
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_b64": base64.b64encode(body).decode(),
        }
        if "signature" in req["headers"]:
            ok, why, covered = verify(req)
        else:
            ok, why, covered = False, "not signed", []
        print(
            json.dumps(
                {
                    "verified": ok,
                    "why": why,
                    "components": covered,
                    "client": self.headers.get("Portcullis-Client"),
                    "request": req,
                }
            ),
            flush=True,
        )
        answer = json.dumps({"verified": ok, "why": why}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 3:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
