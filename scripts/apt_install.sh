#!/bin/sh
# apt_install.sh PACKAGE COMMAND WHAT — install Debian's PACKAGE for WHAT unless COMMAND is already there.
#
# Why a script: `make test` installs what its tests need (a broker, a PKCS#11 token, a browser), and each needs
# the same care: only where apt-get can run (root, or password-less sudo), quietly, and with one `apt-get update`
# and a retry when the package lists are empty or stale (a fresh container has none). Anywhere it cannot, it
# says why in one line and the tests that need it skip with their own reason; it never fails the build.
set -u
package=$1 command=$2 what=$3
if command -v "$command" >/dev/null 2>&1 || [ -x "/usr/sbin/$command" ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "make: no apt-get here: not installing $package; $what will skip"; exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
	echo "make: not root and no password-less sudo: not installing $package; $what will skip"; exit 0
fi
echo "make: installing Debian's $package for $what"
install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$package" >/dev/null 2>&1; }
install || { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 && install; } ||
	echo "make: apt-get could not install $package; $what will skip"
exit 0
