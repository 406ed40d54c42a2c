# mesh-registry %postun (RPM). $1: 0 = erase, 1 = upgrade.
# No restart on upgrade (restart hosts in batches). RPM has no purge: following the Fedora
# guidelines, erase keeps /var/lib/mesh-registry and the mesh-registry user (wipe by hand:
# userdel mesh-registry; rm -rf /var/lib/mesh-registry), unlike `dpkg --purge`.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
