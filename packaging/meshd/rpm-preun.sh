# meshd %preun (RPM). $1: 0 = erase, 1 = upgrade (the old package's scriptlet).
# Erase: disable and stop (a graceful drain). An upgrade leaves the service running.
if [ $1 -eq 0 ]; then
	systemctl --no-reload disable --now meshd.service >/dev/null 2>&1 || :
fi
exit 0
