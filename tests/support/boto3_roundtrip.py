"""Drives boto3 (unmodified, with dummy keys) through the proxy, for tests/sigv4.rs.

Usage: boto3_roundtrip.py ENDPOINT PROXY|- CA_FILE|- REGION
PUTs an object, GETs it back and prints one JSON line: {"put": status, "get": status,
"same": bool} or {"error": code, "message": text} when S3 (the verifying server) refused.
"""
import json
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, proxy, ca, region = sys.argv[1:5]
client = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name=region,
    # Dummy keys: the proxy re-signs with the real ones. ($BOTO_KEY_ID / $BOTO_SECRET override
    # them, to show the verifying server refuses a wrong signature.)
    aws_access_key_id=os.environ.get("BOTO_KEY_ID", "AKIDDUMMYDUMMYDUMMY"),
    aws_secret_access_key=os.environ.get("BOTO_SECRET", "dummy-secret-the-pipeline-holds"),
    verify=ca if ca != "-" else True,
    config=Config(
        proxies={"http": proxy, "https": proxy} if proxy != "-" else None,
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1},
    ),
)
data = b"artifact bytes \x00\x01\x02 " * 1000
try:
    put = client.put_object(Bucket="artifacts", Key="builds/1/app.tar", Body=data)
    got = client.get_object(Bucket="artifacts", Key="builds/1/app.tar")
    body = got["Body"].read()
    print(
        json.dumps(
            {
                "put": put["ResponseMetadata"]["HTTPStatusCode"],
                "get": got["ResponseMetadata"]["HTTPStatusCode"],
                "same": body == data,
            }
        )
    )
except ClientError as e:
    print(json.dumps({"error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", "")}))
