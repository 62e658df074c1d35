#!/bin/sh
# SeaweedFS container entrypoint (docker-compose.yml): the S3 identity from the environment
# (never baked into the image or the compose file), then master + volume + filer + S3 gateway.
set -eu
umask 077
cat >/tmp/s3.json <<JSON
{"identities": [{"name": "sslflow", "credentials": [{"accessKey": "${S3_ACCESS_KEY}", "secretKey": "${S3_SECRET_KEY}"}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
exec weed server -dir=/data -ip=seaweedfs -ip.bind=0.0.0.0 -master.volumeSizeLimitMB=1024 -master.telemetry=false \
    -volume.max=0 -filer -s3 -s3.port=8333 -s3.config=/tmp/s3.json -s3.port.iceberg=0 -s3.port.lance=0
