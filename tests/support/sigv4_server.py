"""An S3-like server that verifies AWS SigV4 independently of the proxy, for tests/sigv4.rs.

Every request's signature is recomputed with botocore's own signer (the one boto3 and the AWS
CLI sign with) from the request as received and the *real* secret key; the payload hash is
checked against the body when it is a digest. Objects PUT are kept in memory and served by GET.

Usage: sigv4_server.py ACCESS_KEY_ID REGION SERVICE [CERT_PEM KEY_PEM]
       (the secret key in $SIGV4_SECRET, an expected session token in $SIGV4_SESSION_TOKEN)
Prints the listening port on stdout, then one JSON line per request:
{"method", "path", "verified", "why", "signed_headers", "content_sha256", "body_len"}.
A request that fails verification gets 403 with an S3 `SignatureDoesNotMatch` error body.
"""
import datetime
import hashlib
import hmac
import json
import os
import re
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY, REGION, SERVICE = sys.argv[1:4]
SECRET = os.environ["SIGV4_SECRET"]
SESSION_TOKEN = os.environ.get("SIGV4_SESSION_TOKEN")
AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$"
)
OBJECTS = {}
LOCK = threading.Lock()


def read_chunked(rfile):
    """The payload of a Transfer-Encoding: chunked body."""
    out = b""
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return out
        out += rfile.read(size)
        rfile.readline()


def decode_aws_chunked(body):
    """The object bytes of an aws-chunked body (`hex[;ext]\\r\\n data \\r\\n … 0\\r\\n trailers`)."""
    out, rest = b"", body
    while True:
        line, rest = rest.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        rest = rest[size + 2:]


def verify(handler, body):
    """(ok, why, signed_headers) for the request `handler` received with `body`."""
    auth = handler.headers.get("Authorization", "")
    m = AUTH_RE.match(auth)
    if not m:
        return False, "no SigV4 Authorization header", []
    access_key, date, region, service, signed, signature = m.groups()
    signed = signed.split(";")
    if access_key != ACCESS_KEY:
        return False, "unknown access key %s" % access_key, signed
    if (region, service) != (REGION, SERVICE):
        return False, "wrong scope %s/%s" % (region, service), signed
    amz_date = handler.headers.get("X-Amz-Date", "")
    if not amz_date.startswith(date):
        return False, "x-amz-date does not match the scope date", signed
    when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc
    )
    skew = abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds())
    if skew > 900:
        return False, "request time too skewed", signed
    for required in ("host", "x-amz-date", "x-amz-content-sha256"):
        if required not in signed:
            return False, "%s is not signed" % required, signed
    for name in handler.headers.keys():
        lname = name.lower()
        if lname.startswith("x-amz-") and lname not in signed:
            return False, "%s is sent but not signed" % lname, signed
    token = handler.headers.get("X-Amz-Security-Token")
    if SESSION_TOKEN is not None:
        if token != SESSION_TOKEN or "x-amz-security-token" not in signed:
            return False, "session token missing, wrong or unsigned", signed
    elif token is not None:
        return False, "unexpected session token", signed
    content_sha = handler.headers.get("X-Amz-Content-SHA256", "")
    if re.fullmatch(r"[0-9a-f]{64}", content_sha):
        if hashlib.sha256(body).hexdigest() != content_sha:
            return False, "x-amz-content-sha256 does not match the body", signed
    # Rebuild the request with exactly the signed headers and let botocore sign it.
    headers = {}
    for name in signed:
        value = handler.headers.get_all(name)
        if value is None:
            return False, "signed header %s is missing" % name, signed
        headers[name] = ",".join(value)
    request = AWSRequest(
        method=handler.command,
        url="http://%s%s" % (headers["host"], handler.path),
        headers=headers,
        data=body,
    )
    request.context["timestamp"] = amz_date
    signer_class = S3SigV4Auth if SERVICE == "s3" else SigV4Auth
    signer = signer_class(Credentials(ACCESS_KEY, SECRET, SESSION_TOKEN), SERVICE, REGION)
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    expected = signer.signature(string_to_sign, request)
    if not hmac.compare_digest(expected, signature):
        return False, "signature does not match", signed
    return True, "", signed


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = read_chunked(self.rfile)
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        ok, why, signed = verify(self, raw)
        body = raw
        if "aws-chunked" in self.headers.get("Content-Encoding", ""):
            body = decode_aws_chunked(raw)
        print(
            json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "verified": ok,
                    "why": why,
                    "signed_headers": signed,
                    "content_sha256": self.headers.get("X-Amz-Content-SHA256"),
                    "body_len": len(body),
                }
            ),
            flush=True,
        )
        if not ok:
            self.answer(
                403,
                b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SignatureDoesNotMatch"
                b"</Code><Message>" + why.encode() + b"</Message></Error>",
                "application/xml",
            )
            return
        key = self.path.split("?", 1)[0]
        if key.endswith("/echo-security-token"):
            # A careless upstream reflecting the session token: the proxy must mask it.
            token = self.headers.get("X-Amz-Security-Token", "").encode()
            self.answer(200, b"token=" + token, extra={"X-Echo": token.decode()})
            return
        if self.command == "PUT":
            with LOCK:
                OBJECTS[key] = body
            etag = '"%s"' % hashlib.md5(body).hexdigest()
            self.answer(200, b"", extra={"ETag": etag})
        elif self.command in ("GET", "HEAD"):
            with LOCK:
                data = OBJECTS.get(key)
            if data is None:
                self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            else:
                self.answer(200, data, "application/octet-stream", head=self.command == "HEAD")
        else:
            # Any other signed request (a POST to a non-S3 service): echo what was verified.
            self.answer(200, json.dumps({"body_len": len(body)}).encode(), "application/json")

    def answer(self, status, body, ctype="text/plain", extra=None, head=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 5:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
