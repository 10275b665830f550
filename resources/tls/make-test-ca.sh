#!/usr/bin/env bash
# Creates a throw-away test CA and one tls_dir per host it signs, for trying
# ferry's mutual-TLS migration (see the README, "Migration over TLS").
#
#   resources/tls/make-test-ca.sh OUT HOST [HOST...]
#
# OUT/ca.key, OUT/ca.pem         the CA (keep ca.key away from the hosts)
# OUT/HOST/{ca.pem,cert.pem,key.pem}   a tls_dir: give it to ferry
#
# Each host certificate names HOST, localhost and 127.0.0.1 (as DNS/IP
# subject alternative names), with HOST as its common name, and is valid for
# both TLS roles (a host may send and receive). Keys are P-256 and
# certificates last 30 days. For production, use your own CA.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT HOST [HOST...]" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
umask 077
if [[ ! -f $out/ca.pem ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$out/ca.key" -out "$out/ca.pem" -days 30 -subj "/CN=ferry test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
for host in "$@"; do
    d=$out/$host
    mkdir -p "$d"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/key.pem" -out "$d/req.csr" -subj "/CN=$host" 2>/dev/null
    ext=$(mktemp)
    printf '%s\n' "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth,clientAuth" "basicConstraints=CA:FALSE" >"$ext"
    openssl x509 -req -in "$d/req.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -days 30 -out "$d/cert.pem" -extfile "$ext" 2>/dev/null
    rm -f "$ext" "$d/req.csr"
    cp "$out/ca.pem" "$d/ca.pem"
    echo "$d"
done
