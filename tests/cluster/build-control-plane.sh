#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler) from Debian bookworm's `kubernetes` source package, plus Debian's etcd.
#
#   tests/cluster/build-control-plane.sh            # build (or reuse the cache), print bin dir
#   FINETUNE_K8S_CACHE=/some/dir tests/cluster/build-control-plane.sh
#   FINETUNE_K8S_KEEP_WORK=1 ...                    # keep sources + Go build cache afterwards
#
# Idempotent: when $CACHE/v1.20.2/bin/ holds the binaries it only checks that etcd is
# installed and prints the directory. Safe to run concurrently (flock). Needs root for
# apt-get (only when packages are missing). See tests/cluster/README.md.
set -Eeuo pipefail
# The whole body is one { } block: bash parses it completely before running it, so
# editing this file while a build runs cannot break that build.
{

K8S_VERSION=1.20.2
CACHE_ROOT=${FINETUNE_K8S_CACHE:-/var/cache/finetune-k8s}
CACHE=$CACHE_ROOT/v$K8S_VERSION
BIN=$CACHE/bin
WORK=$CACHE/work
LOG=$CACHE/build.log
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd)
RUNTIME_PKGS=(openssl)   # bin/ holds a copy of Debian's (static) etcd
BUILD_PKGS=(golang-go etcd-server golang-github-modern-go-reflect2-dev
            golang-github-json-iterator-go-dev dpkg-dev openssl ca-certificates)

mkdir -p "$CACHE"
STEP="start"
say() { printf '[build-control-plane] %s\n' "$*" >&2; printf '%s %s\n' "$(date '+%F %T')" "$*" >>"$LOG"; }
on_error() {
    local rc=$?
    [[ $BASHPID == "$$" ]] || exit "$rc"   # report once, from the main shell
    {
        echo
        echo "[build-control-plane] FAILED (exit $rc) during step: $STEP"
        echo "[build-control-plane] full log: $LOG ; last lines:"
        tail -n 40 "$LOG" | sed 's/^/    /'
    } >&2
    exit "$rc"
}
trap on_error ERR

have_binaries() {
    local b
    for b in "${BINARIES[@]}"; do [[ -x $BIN/$b ]] || return 1; done
}

missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

ensure_pkgs() {
    local missing
    missing=$(missing_pkgs "$@" | xargs -r echo)
    [[ -z $missing ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "[build-control-plane] need root to install Debian packages: $missing" >&2
        return 1
    fi
    STEP="apt-get install $missing"
    say "installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >>"$LOG" 2>&1
    apt-get install -y -qq --no-install-recommends $missing >>"$LOG" 2>&1
}

# Fast path: cached binaries.
if have_binaries; then
    ensure_pkgs "${RUNTIME_PKGS[@]}"
    echo "$BIN"
    exit 0
fi

exec 9>"$CACHE_ROOT/.build-v$K8S_VERSION.lock"
flock -n 9 || { say "another build is running; waiting for its lock"; flock 9; }
if have_binaries; then echo "$BIN"; exit 0; fi   # another process built it meanwhile

START=$(date +%s)
say "building Kubernetes v$K8S_VERSION control plane into $BIN (log: $LOG)"
ensure_pkgs "${BUILD_PKGS[@]}"
mkdir -p "$WORK"

# --- 1. source package, from a private sources list (the system's is left alone) -------
GOPATH_DIR=$WORK/gopath
SRC=$GOPATH_DIR/src/k8s.io/kubernetes
if [[ ! -f $WORK/.source-unpacked ]]; then
    STEP="fetch source package"
    say "fetching Debian source package 'kubernetes'"
    APT=$WORK/apt
    rm -rf "$APT" "$WORK/dl" "$SRC"
    mkdir -p "$APT/lists/partial" "$WORK/dl"
    echo "deb-src http://deb.debian.org/debian bookworm main" >"$APT/sources.list"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$APT/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
    apt-get "${APT_OPTS[@]}" update -qq >>"$LOG" 2>&1
    pushd "$WORK/dl" >/dev/null
    apt-get "${APT_OPTS[@]}" source --download-only "kubernetes" >>"$LOG" 2>&1
    popd >/dev/null
    DSC=$(ls "$WORK"/dl/kubernetes_*.dsc)
    case $(basename "$DSC") in
        # bookworm ships "1.20.5+really1.20.2-1.1+deb12u1": upstream 1.20.2 source
        kubernetes_$K8S_VERSION*|kubernetes_*really$K8S_VERSION*) ;;
        *) echo "expected kubernetes $K8S_VERSION source, got $(basename "$DSC")" >>"$LOG"; false ;;
    esac
    STEP="unpack source package"
    say "unpacking $(basename "$DSC")"
    rm -rf "$WORK/unpacked"
    dpkg-source --no-check -x "$DSC" "$WORK/unpacked" >>"$LOG" 2>&1
    mkdir -p "$(dirname "$SRC")"
    mv "$WORK/unpacked" "$SRC"
    rm -rf "$WORK/dl"
    touch "$WORK/.source-unpacked"
fi

STEP="check source tree"
export GO111MODULE=off GOPATH=$GOPATH_DIR GOCACHE=$WORK/gocache GOFLAGS= GOTOOLCHAIN=local
export CGO_ENABLED=0 GOPROXY=off
cd "$SRC"
[[ -d vendor/k8s.io/apimachinery ]] || { echo "no vendor/ tree in $SRC" >>"$LOG"; false; }

# --- 2. vendor patch: Go 1.19 needs reflect2 >= 1.0.2 and a matching json-iterator -------
if [[ ! -f $WORK/.vendor-patched ]]; then
    STEP="patch vendor (reflect2, json-iterator)"
    say "replacing vendor/github.com/modern-go/reflect2 and json-iterator/go with Debian's"
    for d in github.com/modern-go/reflect2 github.com/json-iterator/go; do
        [[ -d /usr/share/gocode/src/$d ]] || { echo "missing /usr/share/gocode/src/$d" >>"$LOG"; false; }
        rm -rf "vendor/$d"
        cp -rL "/usr/share/gocode/src/$d" "vendor/$d"
        find "vendor/$d" -name '*_test.go' -delete
    done
    touch "$WORK/.vendor-patched"
fi

# --- 3. generate pkg/generated/openapi/zz_generated.openapi.go ---------------------------
OPENAPI_FILE=pkg/generated/openapi/zz_generated.openapi.go
if [[ ! -s $OPENAPI_FILE ]]; then
    STEP="build openapi-gen"
    say "building openapi-gen"
    go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen >>"$LOG" 2>&1
    STEP="generate openapi"
    # Same selection as build/root/Makefile.generated_files (KUBE_OPENAPI_TAG_FILES).
    # -R: vendor/k8s.io/* are symlinks into staging/src/k8s.io/*.
    INPUTS=$(grep -RlE --include='*.go' '^// *\+k8s:openapi-gen=' pkg cmd plugin vendor/k8s.io \
             | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
                       -e '/testdata/' -e '/_' \
             | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
    if (( $(tr ',' '\n' <<<"$INPUTS" | wc -l) < 50 )); then
        echo "found too few +k8s:openapi-gen packages: $INPUTS" >>"$LOG"; false
    fi
    say "generating openapi over $(tr ',' '\n' <<<"$INPUTS" | wc -l) packages"
    "$WORK/openapi-gen" --logtostderr \
        -i "$INPUTS" \
        -p k8s.io/kubernetes/pkg/generated/openapi \
        -O zz_generated.openapi \
        -o "$GOPATH_DIR/src" \
        -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
        -r "$WORK/openapi-violations.report" >>"$LOG" 2>&1 \
        || { rm -f "$OPENAPI_FILE"; false; }
    [[ -s $OPENAPI_FILE ]] || { echo "openapi-gen wrote no $OPENAPI_FILE" >>"$LOG"; false; }
fi

# --- 4. build the three binaries with version stamps ---------------------------------------
STEP="go build kube-apiserver kube-controller-manager kube-scheduler"
say "go build (takes ~7 minutes on 2 cores)"
VPKG=k8s.io/kubernetes/vendor/k8s.io/component-base/version
CPKG=k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version
LDFLAGS="-s -w"
for p in $VPKG $CPKG; do
    LDFLAGS+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=20"
    LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    LDFLAGS+=" -X $p.gitCommit=debian-bookworm-$K8S_VERSION"
done
TMPBIN=$WORK/bin.tmp
rm -rf "$TMPBIN"; mkdir -p "$TMPBIN"
go build -ldflags "$LDFLAGS" -o "$TMPBIN/" \
    ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler >>"$LOG" 2>&1
STEP="verify binaries"
cp "$(command -v etcd)" "$TMPBIN/etcd"
"$TMPBIN/kube-apiserver" --version >>"$LOG" 2>&1
"$TMPBIN/kube-apiserver" --version | grep -q "v$K8S_VERSION"
mkdir -p "$BIN"
for b in "${BINARIES[@]}"; do mv -f "$TMPBIN/$b" "$BIN/$b"; done
rmdir "$TMPBIN"

if [[ ${FINETUNE_K8S_KEEP_WORK:-0} != 1 ]]; then
    STEP="clean work dir"
    cd /
    rm -rf "$WORK"
fi
say "done in $(( $(date +%s) - START ))s"
echo "$BIN"
exit 0
}
