# meshd %post (RPM). $1: 1 = first install, 2 = upgrade.
# Same owner and mode as the unit's StateDirectory=meshd / StateDirectoryMode=0700.
install -d -o meshd -g meshd -m 0700 /var/lib/meshd
[ -d /etc/meshd/services.d ] || install -d -m 0755 /etc/meshd/services.d
if [ $1 -eq 1 ]; then
	# First install: enable, do not start (the operator configures first). An explicit enable
	# rather than a preset, to match the deb; an upgrade keeps an administrator's disable.
	systemctl --no-reload enable meshd.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
