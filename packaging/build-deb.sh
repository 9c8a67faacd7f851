#!/usr/bin/env bash
# edgeid_<version>_<arch>.deb from a built tree (make tree): the tree under /opt/edgeid, the
# edgeid command on PATH, the systemd unit, sysusers and tmpfiles entries. Plain dpkg-deb: the
# tree is already what ships (see the README, "Install on a box", for why not dh-virtualenv).
# Usage: build-deb.sh TREE OUT_DIR VERSION ARCH
set -euo pipefail
tree=$1 out=$2 version=$3 arch=$4
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
stage=$(mktemp -d "${out}/.deb-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root

mkdir -p "$root/opt" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/edgeid" "$root/usr/share/lintian/overrides" \
    "$root/DEBIAN"
cp -a "$tree" "$root/opt/edgeid"
# Bytecode is made on the box by postinst (and removed by prerm), as Debian's Python policy asks.
find "$root/opt/edgeid" -name __pycache__ -type d -prune -exec rm -rf {} +
ln -s /opt/edgeid/bin/edgeid "$root/usr/bin/edgeid"
install -m 0644 "$repo/firmware/systemd/edgeid.service" "$root/lib/systemd/system/edgeid.service"
install -m 0644 "$repo/firmware/systemd/sysusers.d/edgeid.conf" "$root/usr/lib/sysusers.d/edgeid.conf"
install -m 0644 "$here/debian/tmpfiles.conf" "$root/usr/lib/tmpfiles.d/edgeid.conf"
install -m 0644 "$here/debian/copyright" "$root/usr/share/doc/edgeid/copyright"
install -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/edgeid"
date=$(date -u -R -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
sed -e "s/@VERSION@/$version/" -e "s/@DATE@/$date/" "$here/debian/changelog.in" \
    | gzip -9n >"$root/usr/share/doc/edgeid/changelog.gz"
chmod 0644 "$root/usr/share/doc/edgeid/changelog.gz"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    "$here/debian/control.in" >"$root/DEBIAN/control"
# Files as root's; folders 0755, so the service user reads the code it may not change.
find "$root" -type d -exec chmod 0755 {} +
deb="$out/edgeid_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip -z3 --build "$root" "$deb.tmp" >/dev/null
mv "$deb.tmp" "$deb"
echo "$deb"
