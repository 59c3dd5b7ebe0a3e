#!/usr/bin/env bash
# Certificates for a PINK cluster: a CA and the web servers' certificate
# (ssl/), MariaDB's own CA and server certificate (ssl_db/), and etcd's own CA
# (ssl/etcd/) with the members' certificate (peers and clients) and one client
# certificate per etcd user: its CN is the user's name. Called by `make certs`
# and by devcluster (tests point it at private directories).
#
# Idempotent: what exists and fits is kept, what is missing is made. It
# refuses, changing nothing, when a server certificate (web.pem, server.pem,
# member.pem) lacks a requested SAN, or a certificate expires within --within
# days (30), was not signed by the CA in its directory or does not match its
# key. --renew then re-issues every leaf certificate with exactly the
# requested SANs, signed by the existing CAs (a CA is never replaced: clients
# pin it); the old files stay until all new ones are complete. --check only
# verifies and reports: exit 0 when everything fits, 1 when not.
#
# usage: ssl/make-certs.sh [--renew | --check] [--web-dir DIR] [--db-dir DIR]
#            [--etcd-dir DIR] [--days N] [--ca-days N] [--within N] [SAN ...]
#   SAN: DNS:name or IP:address (email:, URI: too), commas may join several;
#        DNS:localhost and IP:127.0.0.1 are always requested
#   --days: lifetime of new leaf certificates (825); --ca-days: of a new CA
#   (3650); --within: how many days before expiry a certificate is refused
#   env: PINK_WEB_CERT_DIR, PINK_DB_CERT_DIR, PINK_ETCD_CERT_DIR,
#        PINK_CERT_DAYS, PINK_CA_DAYS, PINK_CERT_SANS (comma-separated)
set -euo pipefail

prog=make-certs.sh
here=$(cd "$(dirname "$0")" && pwd)
web_dir=${PINK_WEB_CERT_DIR:-$here}
db_dir=${PINK_DB_CERT_DIR:-$here/../ssl_db}
etcd_dir=${PINK_ETCD_CERT_DIR:-}
days=${PINK_CERT_DAYS:-825}
ca_days=${PINK_CA_DAYS:-3650}
within=30
mode=make  # make | renew | check
requested="DNS:localhost,IP:127.0.0.1"
if [[ -n "${PINK_CERT_SANS:-}" ]]; then requested="$requested,$PINK_CERT_SANS"; fi
argv=("$@")

die() { local rc=$1; shift; printf '%s: %s\n' "$prog" "$*" >&2; exit "$rc"; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
join() { local sep=$1 out="" item; shift; for item in "$@"; do out+="${out:+$sep}$item"; done; printf '%s' "$out"; }
# The command line again, as --renew (for the advice).
renew_command() {
    local arg out="$0 --renew"
    for arg in "${argv[@]}"; do
        [[ $arg == --check || $arg == --renew ]] || out+=" $(printf '%q' "$arg")"
    done
    printf '%s' "$out"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --web-dir|--db-dir|--etcd-dir|--days|--ca-days|--within)
            [[ $# -ge 2 ]] || die 2 "$1 needs a value"
            case "$1" in
                --web-dir) web_dir=$2 ;;
                --db-dir) db_dir=$2 ;;
                --etcd-dir) etcd_dir=$2 ;;
                --days) days=$2 ;;
                --ca-days) ca_days=$2 ;;
                --within) within=$2 ;;
            esac
            shift 2 ;;
        --renew|--check)
            [[ $mode == make || $mode == "${1#--}" ]] || die 2 "--renew and --check exclude each other"
            mode=${1#--}; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die 2 "unknown option $1 (see --help)" ;;
        *) requested="$requested,$1"; shift ;;
    esac
done
for opt in days ca_days within; do
    [[ ${!opt} =~ ^[0-9]+$ ]] || die 2 "--${opt/_/-} takes a whole number of days, not '${!opt}'"
done
(( days > 0 && ca_days > 0 )) || die 2 "--days and --ca-days must be at least 1"

# The requested SANs, checked and without repeats (DNS names ignore case).
sans=()
declare -A seen=()
IFS=, read -ra parts <<<"$requested"
for san in "${parts[@]}"; do
    san=${san#"${san%%[![:space:]]*}"}; san=${san%"${san##*[![:space:]]}"}
    [[ -n $san ]] || continue
    case "$san" in
        IP:*)
            ip=${san#IP:}
            [[ $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || ($ip == *:* && $ip =~ ^[0-9A-Fa-f:.]+$) ]] ||
                die 2 "not an IP address: '$san' (a name is DNS:$ip)" ;;
        DNS:?*|email:?*|URI:?*) ;;
        *) die 2 "not a SAN: '$san' (write DNS:name or IP:address)" ;;
    esac
    key=$san; [[ $san == DNS:* ]] && key=${san,,}
    [[ -z ${seen[$key]:-} ]] || continue
    seen[$key]=1
    sans+=("$san")
done
san_csv=$(join , "${sans[@]}")

web_dir=$(realpath -m -- "$web_dir")
db_dir=$(realpath -m -- "$db_dir")
etcd_dir=$(realpath -m -- "${etcd_dir:-$web_dir/etcd}")
# Every CA (directory and name) and every leaf certificate (directory, file
# name without .pem/.key, CN, server or client). A server certificate names
# the SANs; etcd takes a client's user from its CN.
ca_dirs=()
declare -A ca_name=()
for pair in "$web_dir|PINK dev CA" "$db_dir|PINK dev MariaDB CA" "$etcd_dir|PINK dev etcd CA"; do
    dir=${pair%%|*}
    [[ -z ${ca_name[$dir]:-} ]] || continue
    ca_name[$dir]=${pair#*|}
    ca_dirs+=("$dir")
done
leaves=(
    "$web_dir|web|pink-web|server"
    "$db_dir|server|pink-db|server"
    "$etcd_dir|member|pink-etcd|server"
    "$etcd_dir|root|root|client"
    "$etcd_dir|pink-web|pink-web|client"
    "$etcd_dir|pink-runner|pink-runner|client"
)

# ---------------------------------------------------------------- inspection

is_cert() { openssl x509 -noout -in "$1" >/dev/null 2>&1; }
enddate() { openssl x509 -noout -enddate -in "$1" | sed 's/^notAfter=//'; }

# expiry CERT: when it expires, and in how many days.
expiry() {
    local end left
    end=$(enddate "$1")
    if left=$(date -u -d "$end" +%s 2>/dev/null); then
        left=$(( (left - $(date -u +%s)) / 86400 ))
        printf '%s (%s days)' "$end" "$left"
    else
        printf '%s' "$end"
    fi
}

# expiry_problem CERT: nothing, or why its lifetime does not fit.
expiry_problem() {
    openssl x509 -noout -checkend $(( within * 86400 )) -in "$1" >/dev/null 2>&1 && return 0
    if openssl x509 -noout -checkend 0 -in "$1" >/dev/null 2>&1; then
        printf 'expires within %s days: %s' "$within" "$(expiry "$1")"
    else
        printf 'expired: %s' "$(enddate "$1")"
    fi
}

# cert_sans CERT: its subjectAltName entries, one a line, as SANs are written
# here (openssl prints "IP Address:").
cert_sans() {
    local text
    text=$(openssl x509 -noout -ext subjectAltName -in "$1" 2>/dev/null) || return 0
    sed -n '2,$p' <<<"$text" | tr ',' '\n' | sed 's/^[[:space:]]*//; s/^IP Address:/IP:/; /^$/d'
}

# has_san CERT SAN: whether CERT names SAN (IP addresses in any spelling,
# DNS names in any case, others exactly).
has_san() {
    local out names
    case "$2" in
        IP:*)
            out=$(openssl x509 -noout -in "$1" -checkip "${2#IP:}" 2>/dev/null) || return 1
            [[ $out == *" does match "* ]] ;;
        DNS:*) names=$(cert_sans "$1"); grep -qixF -- "$2" <<<"$names" ;;
        *) names=$(cert_sans "$1"); grep -qxF -- "$2" <<<"$names" ;;
    esac
}

key_matches() {
    local a b
    a=$(openssl x509 -noout -pubkey -in "$1" 2>/dev/null) || return 1
    b=$(openssl pkey -pubout -in "$2" 2>/dev/null) || return 1
    [[ -n $a && $a == "$b" ]]
}

# leaf_problems DIR NAME KIND: nothing when DIR/NAME.pem (with NAME.key) fits,
# else why not ("; " between reasons).
leaf_problems() {
    local dir=$1 name=$2 kind=$3 cert=$1/$2.pem out=() missing=() san text
    is_cert "$cert" || { printf 'is not a PEM certificate'; return 0; }
    key_matches "$cert" "$dir/$name.key" || out+=("does not match $name.key")
    if [[ ! -f $dir/ca.pem ]]; then
        out+=("has no CA to be verified against ($dir/ca.pem is missing)")
    elif ! openssl verify -no_check_time -CAfile "$dir/ca.pem" "$cert" >/dev/null 2>&1; then
        out+=("was not signed by the CA in its directory ($dir/ca.pem)")
    fi
    text=$(expiry_problem "$cert"); [[ -z $text ]] || out+=("$text")
    if [[ $kind == server ]]; then
        for san in "${sans[@]}"; do has_san "$cert" "$san" || missing+=("$san"); done
        if (( ${#missing[@]} )); then
            mapfile -t text < <(cert_sans "$cert")
            out+=("lacks the SANs $(join ', ' "${missing[@]}") (it names $(join ', ' "${text[@]}"))")
        fi
    fi
    join '; ' "${out[@]}"
}

# ca_state DIR: both, none, pem (ca.pem without its key: enough to verify,
# not to sign) or key (ca.key alone).
ca_state() {
    local pem=0 key=0
    [[ -f $1/ca.pem ]] && pem=1
    [[ -f $1/ca.key ]] && key=1
    case $pem$key in 11) echo both ;; 00) echo none ;; 10) echo pem ;; 01) echo key ;; esac
}

# ca_problems DIR (ca.pem exists): nothing, or why the CA does not fit.
ca_problems() {
    local dir=$1 out=() text
    is_cert "$dir/ca.pem" || { printf 'is not a PEM certificate'; return 0; }
    if [[ -f $dir/ca.key ]] && ! key_matches "$dir/ca.pem" "$dir/ca.key"; then
        out+=("does not match ca.key")
    fi
    text=$(expiry_problem "$dir/ca.pem"); [[ -z $text ]] || out+=("$text")
    join '; ' "${out[@]}"
}

# ---------------------------------------------------------------- --check

if [[ $mode == check ]]; then
    failed=0 total=0
    report() {  # report PATH PROBLEMS INFO
        total=$(( total + 1 ))
        if [[ -n $2 ]]; then failed=$(( failed + 1 )); printf 'FAIL  %s: %s\n' "$1" "$2"
        else printf 'ok    %s: %s\n' "$1" "$3"; fi
    }
    for dir in "${ca_dirs[@]}"; do
        case $(ca_state "$dir") in
            none) report "$dir/ca.pem" "missing" "" ;;
            key) report "$dir/ca.pem" "missing (ca.key is there)" "" ;;
            *) info="expires $(expiry "$dir/ca.pem")"
               [[ -f $dir/ca.key ]] || info+="; no ca.key here (it can verify, not sign)"
               report "$dir/ca.pem" "$(ca_problems "$dir")" "$info" ;;
        esac
    done
    for leaf in "${leaves[@]}"; do
        IFS='|' read -r dir name cn kind <<<"$leaf"
        if [[ ! -f $dir/$name.pem ]]; then report "$dir/$name.pem" "missing" ""; continue; fi
        if [[ ! -f $dir/$name.key ]]; then report "$dir/$name.pem" "its key $name.key is missing" ""; continue; fi
        info="expires $(expiry "$dir/$name.pem")"
        if [[ $kind == server ]]; then
            mapfile -t names < <(cert_sans "$dir/$name.pem")
            info+="; names $(join ', ' "${names[@]}")"
        fi
        report "$dir/$name.pem" "$(leaf_problems "$dir" "$name" "$kind")" "$info"
    done
    if (( failed )); then
        printf '%s of %s certificates do not fit (SANs %s, %s days ahead).\n' "$failed" "$total" "$san_csv" "$within"
        printf 'Re-issue the leaf certificates with: %s\n' "$(renew_command)"
        exit 1
    fi
    printf 'all %s certificates fit (SANs %s, %s days ahead).\n' "$total" "$san_csv" "$within"
    exit 0
fi

# ---------------------------------------------------------------- plan

problems=()  # existing leaves that do not fit: refused, or renewed by --renew
fatal=()     # what neither mode may fix (CAs)
todo=()      # leaves to issue
declare -A new_ca=() need_ca=()
for dir in "${ca_dirs[@]}"; do
    case $(ca_state "$dir") in
        both|pem)
            text=$(ca_problems "$dir")
            [[ -z $text ]] || fatal+=("$dir/ca.pem: $text") ;;
        key) fatal+=("$dir/ca.key: there is no ca.pem beside it; put it back (or move ca.key away for a new CA)") ;;
        none) ;;
    esac
done
for leaf in "${leaves[@]}"; do
    IFS='|' read -r dir name cn kind <<<"$leaf"
    if [[ -f $dir/$name.pem && -f $dir/$name.key ]]; then
        text=$(leaf_problems "$dir" "$name" "$kind")
        [[ -z $text ]] || problems+=("$dir/$name.pem: $text")
        [[ $mode == renew ]] || continue
    fi
    todo+=("$leaf")  # missing (or half a pair), or renewed
    need_ca[$dir]=1
done
for dir in "${ca_dirs[@]}"; do
    [[ -n ${need_ca[$dir]:-} ]] || continue
    case $(ca_state "$dir") in
        none) new_ca[$dir]=1 ;;
        pem) fatal+=("$dir/ca.key is missing: this CA cannot sign $dir's new certificates; put its key back") ;;
    esac
done

if (( ${#fatal[@]} )) || { [[ $mode == make ]] && (( ${#problems[@]} )); }; then
    {
        echo "$prog: these certificates do not fit; nothing was changed:"
        printf '  %s\n' "${fatal[@]}" "${problems[@]}"
        if (( ${#fatal[@]} )); then
            echo "A CA is never replaced here (clients pin it). To start a new one, move its"
            echo "ca.pem and ca.key away, run again with --renew (which re-issues every"
            echo "certificate it signs) and give every client the new ca.pem."
        else
            echo "Re-issue every leaf certificate, signed by the same CAs (ca.pem stays), with:"
            printf '  %s\n' "$(renew_command)"
            echo "  (make certs CERT_SANS=\"--renew ...\"). They will name exactly $san_csv:"
            echo "  add every name they must keep. Then deploy them again and restart what serves them."
        fi
    } >&2
    exit 1
fi

# ---------------------------------------------------------------- issue

(( ${#todo[@]} )) || exit 0  # everything exists and fits: nothing to do

mkdir -p "${ca_dirs[@]}"
umask 077  # keys are born private
declare -A stage=()
cleanup() { local d; for d in "${stage[@]}"; do rm -rf -- "$d"; done; }
trap cleanup EXIT
for dir in "${ca_dirs[@]}"; do
    [[ -n ${need_ca[$dir]:-} ]] && stage[$dir]=$(mktemp -d "$dir/.make-certs.XXXXXX")
done

# ossl WHAT ARGS...: openssl, its complaints shown only when it fails.
ossl() {
    local what=$1 err
    shift
    err=$(openssl "$@" 2>&1 >/dev/null) || die 1 "openssl failed to $what (nothing was changed): $err"
}

# A self-signed CA whose extensions satisfy strict X.509 verification
# (Python 3.13+ turns VERIFY_X509_STRICT on by default).
stage_ca() {
    local dir=$1 st=${stage[$1]}
    ossl "make $dir/ca.pem" req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$ca_days" \
        -keyout "$st/ca.key" -out "$st/ca.pem" -subj "/O=PINK dev/CN=${ca_name[$dir]}" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
}

# A leaf certificate signed by its directory's CA (the new one if staged): a
# server's (serverAuth and clientAuth, naming the SANs) or a client's.
stage_leaf() {
    local dir=$1 name=$2 cn=$3 kind=$4 st=${stage[$1]} ca=$1
    [[ -z ${new_ca[$dir]:-} ]] || ca=$st
    cat >"$st/$name.ext" <<EXT
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
    if [[ $kind == client ]]; then
        echo "extendedKeyUsage = clientAuth" >>"$st/$name.ext"
    else
        printf 'extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = %s\n' "$san_csv" >>"$st/$name.ext"
    fi
    ossl "make a key for $dir/$name.pem" req -new -newkey rsa:2048 -nodes -sha256 \
        -keyout "$st/$name.key" -out "$st/$name.csr" -subj "/O=PINK dev/CN=$cn"
    ossl "sign $dir/$name.pem" x509 -req -in "$st/$name.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" \
        -CAcreateserial -CAserial "$st/ca.srl" -days "$days" -sha256 \
        -extfile "$st/$name.ext" -out "$st/$name.pem"
    ossl "verify the new $dir/$name.pem against $ca/ca.pem" verify -CAfile "$ca/ca.pem" "$st/$name.pem"
}

# Everything is made in the staging directories first; only when all of it
# is there do the files move into place (a rename each), CAs first.
for dir in "${ca_dirs[@]}"; do
    [[ -z ${new_ca[$dir]:-} ]] || stage_ca "$dir"
done
for leaf in "${todo[@]}"; do
    IFS='|' read -r dir name cn kind <<<"$leaf"
    stage_leaf "$dir" "$name" "$cn" "$kind"
    chmod 644 "${stage[$dir]}/$name.pem"
done
for dir in "${ca_dirs[@]}"; do
    [[ -n ${new_ca[$dir]:-} ]] || continue
    chmod 644 "${stage[$dir]}/ca.pem"
    mv -f -- "${stage[$dir]}/ca.key" "$dir/ca.key"
    mv -f -- "${stage[$dir]}/ca.pem" "$dir/ca.pem"
    echo "made $dir/ca.pem (${ca_name[$dir]}): a new CA, give it to clients" >&2
done
for leaf in "${todo[@]}"; do
    IFS='|' read -r dir name cn kind <<<"$leaf"
    st=${stage[$dir]}
    verb=made dropped=()
    if [[ -f $dir/$name.pem ]] && is_cert "$dir/$name.pem"; then
        verb=renewed
        mapfile -t old < <(cert_sans "$dir/$name.pem")
        for san in "${old[@]}"; do has_san "$st/$name.pem" "$san" || dropped+=("$san"); done
    fi
    mv -f -- "$st/$name.key" "$dir/$name.key"
    mv -f -- "$st/$name.pem" "$dir/$name.pem"
    echo "$verb $dir/$name.pem ($cn)${dropped[*]:+; no longer names $(join ', ' "${dropped[@]}")}" >&2
done
if [[ $mode == renew ]]; then
    echo "renewed the leaf certificates (the CAs are unchanged): deploy them and restart what serves them" >&2
fi
