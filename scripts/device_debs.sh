#!/bin/sh
# Builds nibble on a machine that has a compiler and CUDA but neither the
# Debian -dev packages nor a network (the lent GPU machine).
#   here:   scripts/device_debs.sh fetch      downloads the .deb files into .deps/debs
#   there:  . scripts/device_debs.sh env      unpacks them into .deps/root and exports
#                                             CFLAGS, LDLIBS, LD_LIBRARY_PATH for make
set -e
DIR=.deps
PKGS="libcjson1 libcjson-dev libpcre2-8-0 libpcre2-dev libutf8proc2 libutf8proc-dev libmicrohttpd12
      libmicrohttpd-dev libuv1 libuv1-dev libsystemd0 libsystemd-dev libgnutls30 libgcrypt20 libgpg-error0
      liblz4-1 liblzma5 libzstd1 libcap2"
case "$1" in
fetch)
    mkdir -p "$DIR/debs"
    (cd "$DIR/debs" && apt-get download $PKGS)
    echo "$(ls "$DIR/debs" | wc -l) packages in $DIR/debs; carry $DIR to the device"
    ;;
env)
    [ -d "$DIR/debs" ] || { echo "device_debs: no $DIR/debs (run 'scripts/device_debs.sh fetch' where apt works)" >&2; return 1 2>/dev/null || exit 1; }
    root="$(pwd)/$DIR/root"
    mkdir -p "$root"
    for d in "$DIR"/debs/*.deb; do dpkg -x "$d" "$root"; done
    lib="$root/usr/lib/x86_64-linux-gnu"
    # the -dev packages' unversioned .so links point at /lib paths: make them local
    for l in "$lib"/*.so; do
        t=$(readlink "$l" || true)
        case "$t" in /*) ln -sf "$root$t" "$l" ;; esac
    done
    export CFLAGS="-O2 -g -I$root/usr/include"
    export LDLIBS="-L$lib -L$root/lib/x86_64-linux-gnu -Wl,-rpath-link,$lib"
    export LD_LIBRARY_PATH="$lib:$root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "device_debs: headers and libraries from $root"
    ;;
*)
    echo "usage: scripts/device_debs.sh fetch | . scripts/device_debs.sh env" >&2
    exit 2
    ;;
esac
