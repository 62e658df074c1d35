#!/bin/sh
# SeaweedFS entrypoint (compose and Kubernetes): `server` = master + volume + filer (compose: on the
# internal `storage` network only, never published), `s3` = the S3 gateway in front of that filer
# (compose), `all` = master + volume + filer + S3 gateway in one process (Kubernetes, where a
# NetworkPolicy keeps the internal ports to SeaweedFS itself).
#   S3_JWT_KEY signs the volume and filer HTTP APIs (SeaweedFS reads WEED_JWT_*); the S3 identities come from
#   the environment (never the image, never a command line): admin (S3_ACCESS_KEY, buckets), mlflow and dvc
#   (each only its bucket). SEAWEEDFS_IP: the name the parts advertise to each other (compose: seaweedfs;
#   Kubernetes: the pod's name under the headless service).
set -eu
. "$(dirname "$0")/secrets.sh"
require S3_JWT_KEY
export WEED_JWT_SIGNING_KEY="$S3_JWT_KEY" WEED_JWT_SIGNING_READ_KEY="$S3_JWT_KEY" \
    WEED_JWT_FILER_SIGNING_KEY="$S3_JWT_KEY" WEED_JWT_FILER_SIGNING_READ_KEY="$S3_JWT_KEY"
umask 077
mode=${1:-server}
ip=${SEAWEEDFS_IP:-seaweedfs}
s3_config() {
    require S3_ACCESS_KEY S3_SECRET_KEY MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY DVC_S3_ACCESS_KEY DVC_S3_SECRET_KEY
    mb=${MLFLOW_BUCKET:-mlflow}
    db=${DVC_BUCKET:-dvc}
    cat >/tmp/s3.json <<JSON
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "${S3_ACCESS_KEY}", "secretKey": "${S3_SECRET_KEY}"}],
   "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
  {"name": "mlflow", "credentials": [{"accessKey": "${MLFLOW_S3_ACCESS_KEY}", "secretKey": "${MLFLOW_S3_SECRET_KEY}"}],
   "actions": ["Read:$mb", "List:$mb", "Tagging:$mb", "Write:$mb"]},
  {"name": "dvc", "credentials": [{"accessKey": "${DVC_S3_ACCESS_KEY}", "secretKey": "${DVC_S3_SECRET_KEY}"}],
   "actions": ["Read:$db", "List:$db", "Tagging:$db", "Write:$db"]}
]}
JSON
}
case $mode in
    server)
        exec weed -logtostderr server -dir=/data -ip="$ip" -ip.bind=0.0.0.0 -master.volumeSizeLimitMB=1024 \
            -master.telemetry=false -volume.max=0 -filer -filer.localSocket=/tmp/filer.sock ;;
    s3)
        s3_config
        exec weed -logtostderr s3 -filer="${SEAWEEDFS_FILER:-seaweedfs:8888}" -ip.bind=0.0.0.0 -port=8333 \
            -config=/tmp/s3.json -localSocket=/tmp/s3.sock -port.iceberg=0 -port.lance=0 ;;
    all)
        s3_config
        exec weed -logtostderr server -dir=/data -ip="$ip" -ip.bind=0.0.0.0 -master.volumeSizeLimitMB=1024 \
            -master.telemetry=false -volume.max=0 -filer -filer.localSocket=/tmp/filer.sock \
            -s3 -s3.port=8333 -s3.config=/tmp/s3.json -s3.localSocket=/tmp/s3.sock -s3.port.iceberg=0 -s3.port.lance=0 ;;
    *) echo "usage: $0 server|s3|all" >&2; exit 2 ;;
esac
