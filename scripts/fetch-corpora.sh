#!/usr/bin/env bash
# Fetch the real text `usaf bench quality` uses, without root: the Debian packages python3.11-doc
# (Python's reST documentation) and fortunes (English quotations), unpacked into $USAF_CORPORA
# (default ~/.cache/usaf/corpora). Needs apt-get and dpkg-deb (Debian / Ubuntu).
set -euo pipefail
dest="${USAF_CORPORA:-$HOME/.cache/usaf/corpora}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
apt-get download python3.11-doc fortunes fortunes-min >/dev/null
for deb in ./*.deb; do dpkg-deb -x "$deb" "$dest"; done
echo "corpora in $dest: $(find "$dest" -name '*.rst.txt' | wc -l) doc files, $(ls "$dest/usr/share/games/fortunes" | wc -l) fortunes files"
