#!/bin/bash
# idemgate container health check (the Dockerfile's HEALTHCHECK): an HTTP GET
# on the admin listener with bash's /dev/tcp, since the image has no curl.
# Usage: idemgate-healthcheck [PATH]   (default /healthz; /readyz also works)
# IDEMGATE_HEALTHCHECK_ADDR=host:port must reach admin.listen (default 127.0.0.1:9090).
# Exit 0 on an HTTP 200, 1 otherwise.
set -u
addr="${IDEMGATE_HEALTHCHECK_ADDR:-127.0.0.1:9090}"
path="${1:-/healthz}"
host="${addr%:*}"
port="${addr##*:}"
if ! exec 3<>"/dev/tcp/${host}/${port}"; then
  echo "unhealthy: cannot connect to ${addr}" >&2
  exit 1
fi
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "${path}" "${addr}" >&3
if ! IFS= read -r -t 3 status <&3; then
  echo "unhealthy: no answer from ${addr}${path}" >&2
  exit 1
fi
status="${status%$'\r'}"
case "${status}" in
  "HTTP/1."[01]" 200"*) exit 0 ;;
  *) echo "unhealthy: ${addr}${path} answered: ${status}" >&2; exit 1 ;;
esac
