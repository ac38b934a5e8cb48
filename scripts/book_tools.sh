#!/bin/sh
# Install what `make book` and the browser check need: Debian's chromium and
# MathJax 2 (libjs-mathjax). Idempotent: does nothing when both are present.
set -eu
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
[ -f /usr/share/javascript/mathjax/MathJax.js ] || need="$need libjs-mathjax fonts-mathjax"
if [ -n "$need" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
