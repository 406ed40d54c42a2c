# mesh-registry %pre (RPM): the system user and group exist before the files are laid down.
# $1: 1 = first install, 2 = upgrade.
getent group mesh-registry >/dev/null || groupadd -r mesh-registry
getent passwd mesh-registry >/dev/null || \
	useradd -r -g mesh-registry -d /var/lib/mesh-registry -M -s /sbin/nologin -c "mesh registry (CA, identities, policy)" mesh-registry
exit 0
