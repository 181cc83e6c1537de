#!/usr/bin/env bash
# Makes a cluster CA and one node certificate under DIR, for TLS on the
# client port and mutual TLS between nodes (tallyd --tls-cert --tls-key
# --peer-ca [--tls-client-ca]). Uses openssl; idempotent (keeps what exists).
#
#   scripts/make-certs.sh DIR [SAN...]    SANs default to IP:127.0.0.1 DNS:localhost
#
# Writes DIR/ca.pem, DIR/ca.key (keep it private), DIR/node.pem, DIR/node.key.
# Every node may share node.pem on one host; on several hosts run it once
# per host with that host's names (the CA is reused if DIR has it).
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR [SAN...]}; shift
sans=("$@"); ((${#sans[@]})) || sans=(IP:127.0.0.1 DNS:localhost)
mkdir -p "$dir"; chmod 700 "$dir"
command -v openssl >/dev/null || { echo "make-certs: openssl is required (apt-get install openssl)" >&2; exit 1; }
if [[ ! -f "$dir/ca.pem" ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" -subj "/CN=Tally cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [[ ! -f "$dir/node.pem" ]]; then
  san=$(IFS=,; echo "${sans[*]}")
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/node.key" \
    -out "$dir/node.csr" -subj "/CN=tally node" 2>/dev/null
  openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 825 \
    -out "$dir/node.pem" -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' "$san") 2>/dev/null
  rm -f "$dir/node.csr"
fi
chmod 600 "$dir"/*.key
