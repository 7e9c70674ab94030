#!/bin/sh
# As MinIO's image: `docker run IMAGE server /data` means `minio server /data`.
set -e
if [ "${1}" != "minio" ] && ! command -v "${1}" >/dev/null 2>&1; then
  set -- minio "$@"
fi
exec "$@"
