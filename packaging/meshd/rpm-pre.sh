# meshd %pre (RPM): the system user and group exist before the files are laid down.
# $1: 1 = first install, 2 = upgrade.
getent group meshd >/dev/null || groupadd -r meshd
getent passwd meshd >/dev/null || \
	useradd -r -g meshd -d /var/lib/meshd -M -s /sbin/nologin -c "meshd service mesh proxy" meshd
exit 0
