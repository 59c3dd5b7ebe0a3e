#!/usr/bin/env bash
# Development certificates for a PINK cluster: a dev CA and the web servers'
# certificate (ssl/), MariaDB's own CA and server certificate (ssl_db/), and
# etcd's own CA (ssl/etcd/) with the members' certificate (peers and clients)
# and one client certificate per etcd user: its CN is the user's name.
# Called by `make certs` and by devcluster.local (tests point it at private
# directories). Idempotent: a file that exists is kept; delete it to renew.
#
# usage: ssl/make-certs.sh [--web-dir DIR] [--db-dir DIR] [--etcd-dir DIR] [--days N] [SAN ...]
#   SAN: extra subjectAltName entries such as DNS:web1 or IP:10.77.0.11
#   env: PINK_WEB_CERT_DIR, PINK_DB_CERT_DIR, PINK_ETCD_CERT_DIR,
#        PINK_CERT_SANS (comma-separated)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
web_dir=${PINK_WEB_CERT_DIR:-$here}
db_dir=${PINK_DB_CERT_DIR:-$here/../ssl_db}
etcd_dir=${PINK_ETCD_CERT_DIR:-}
days=${PINK_CERT_DAYS:-825}
sans="DNS:localhost,IP:127.0.0.1"
if [[ -n "${PINK_CERT_SANS:-}" ]]; then sans="$sans,$PINK_CERT_SANS"; fi

while [[ $# -gt 0 ]]; do
    case "$1" in
        --web-dir) web_dir=$2; shift 2 ;;
        --db-dir) db_dir=$2; shift 2 ;;
        --etcd-dir) etcd_dir=$2; shift 2 ;;
        --days) days=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "make-certs.sh: unknown option $1" >&2; exit 2 ;;
        *) sans="$sans,$1"; shift ;;
    esac
done

etcd_dir=${etcd_dir:-$web_dir/etcd}
mkdir -p "$web_dir" "$db_dir" "$etcd_dir"
umask 077  # keys are born private
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# make_ca DIR NAME: a self-signed CA whose extensions satisfy strict X.509
# verification (Python 3.13+ turns VERIFY_X509_STRICT on by default).
make_ca() {
    local dir=$1 name=$2
    [[ -f "$dir/ca.pem" && -f "$dir/ca.key" ]] && return 0
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$days" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" -subj "/O=PINK dev/CN=$name" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    echo "made $dir/ca.pem" >&2
}

# make_leaf DIR CERT KEY CN [client]: a certificate signed by DIR's CA; a
# server's (serverAuth and clientAuth, naming the SANs) unless "client".
make_leaf() {
    local dir=$1 cert=$2 key=$3 cn=$4 kind=${5:-server}
    [[ -f "$dir/$cert" && -f "$dir/$key" ]] && return 0
    cat >"$tmp/ext.cnf" <<EXT
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
    if [[ $kind == client ]]; then
        echo "extendedKeyUsage = clientAuth" >>"$tmp/ext.cnf"
    else
        printf 'extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = %s\n' "$sans" >>"$tmp/ext.cnf"
    fi
    openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$dir/$key" \
        -out "$tmp/req.csr" -subj "/O=PINK dev/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$tmp/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$days" -sha256 \
        -extfile "$tmp/ext.cnf" -out "$dir/$cert" 2>/dev/null
    chmod 644 "$dir/$cert"
    echo "made $dir/$cert ($cn)" >&2
}

make_ca "$web_dir" "PINK dev CA"
make_leaf "$web_dir" web.pem web.key "pink-web"
make_ca "$db_dir" "PINK dev MariaDB CA"
make_leaf "$db_dir" server.pem server.key "pink-db"
# etcd: members (peer and client TLS), and one client certificate per etcd
# user (etcd takes the user from the CN): root for setup, then the web side
# (web, workers, leader) and the runners, each with only its own.
make_ca "$etcd_dir" "PINK dev etcd CA"
make_leaf "$etcd_dir" member.pem member.key "pink-etcd"
for user in root pink-web pink-runner; do
    make_leaf "$etcd_dir" "$user.pem" "$user.key" "$user" client
done
chmod 644 "$web_dir/ca.pem" "$db_dir/ca.pem" "$etcd_dir/ca.pem"
chmod 600 "$web_dir"/*.key "$db_dir"/*.key "$etcd_dir"/*.key
