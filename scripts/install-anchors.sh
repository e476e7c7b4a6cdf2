#!/usr/bin/env bash
# Installs the peers `tunmesh-lab bench` compares against, into a cache
# directory (default /var/cache/tunmesh/anchors), each only if missing:
#   wireguard-go      Debian's package (apt, via install-deps.sh)
#   wireguard-go-new  the offload-capable wireguard-go from Debian's next
#                     release, fetched with `apt-get download` through a
#                     private sources list that reuses this machine's own
#                     Debian mirror (the system's apt setup is untouched);
#                     its package version goes to wireguard-go-new.version
#                     (the binary's --version says v0.0.20230223 for code
#                     of 2023-12, so the bench reports the package's)
#   boringtun-cli     `cargo install boringtun-cli`
# A peer that cannot be had is reported; the bench then lists it as missing.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=${TUNMESH_ANCHORS:-/var/cache/tunmesh/anchors}
mkdir -p "$CACHE"
scripts/install-deps.sh || exit 1

if [ ! -x "$CACHE/wireguard-go-new" ] || [ ! -s "$CACHE/wireguard-go-new.version" ]; then
    work=$(mktemp -d)
    mkdir -p "$work/lists/partial"
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" >"$work/sources.list"
    O=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=/nonexistent -o Dir::State::Lists="$work/lists")
    if [ -n "$uri" ] && apt-get "${O[@]}" update -qq >/dev/null 2>&1 &&
        (cd "$work" && apt-get "${O[@]}" download wireguard-go >/dev/null 2>&1); then
        deb=$(ls "$work"/wireguard-go_*.deb | head -1)
        dpkg-deb -x "$deb" "$work/x" &&
            cp "$work/x/usr/bin/wireguard-go" "$CACHE/wireguard-go-new" &&
            dpkg-deb -f "$deb" Version >"$CACHE/wireguard-go-new.version" &&
            echo "wireguard-go-new: Debian package $(cat "$CACHE/wireguard-go-new.version")"
    else
        echo "wireguard-go-new: could not fetch wireguard-go from Debian trixie; the bench reports it missing" >&2
    fi
    rm -rf "$work"
fi

if [ ! -x "$CACHE/boringtun-cli" ]; then
    echo "building boringtun-cli (cargo install, about a minute)..." >&2
    if cargo install --quiet boringtun-cli --root "$CACHE/boringtun" >/dev/null 2>&1; then
        ln -sf "$CACHE/boringtun/bin/boringtun-cli" "$CACHE/boringtun-cli"
    else
        echo "boringtun-cli: cargo install failed; the bench reports it missing" >&2
    fi
fi
exit 0
