#!/bin/sh
# Deploys a new instance of app@.service with zdt: the new instance starts beside the old one,
# zdt-ctl promote switches the port to it once its /readyz answers 200 and it has stayed healthy
# through its probation, then stops the old one. On any failure the new instance is stopped and
# the old one keeps the port: zdt changed nothing, or restored what it had changed.
#
# Environment: UNIT (default app), A and B (the two instance names = admin ports, default 8081
# and 8082), TIMEOUT (readiness, default 60s), PROBATION (default 10s).
set -eu
UNIT=${UNIT:-app}
A=${A:-8081}
B=${B:-8082}
if systemctl is-active --quiet "$UNIT@$A"; then OLD=$A NEW=$B; else OLD=$B NEW=$A; fi

# The running instance must be zdt's active member before the new one listens. An instance that
# systemd started by itself (enabled at boot, started by hand, restarted after a crash) never
# was, and while no active member lives, the kernel's own hashing sends the new instance its
# share of new connections as it warms up (503s). Promoting the active member again changes
# nothing.
if systemctl is-active --quiet "$UNIT@$OLD"; then
    zdt-ctl promote "$(systemctl show -p MainPID --value "$UNIT@$OLD")" \
        --readyz "http://127.0.0.1:$OLD/readyz" --timeout "${TIMEOUT:-60s}" >/dev/null
fi

systemctl start "$UNIT@$NEW"
PID=$(systemctl show -p MainPID --value "$UNIT@$NEW")

rc=0
zdt-ctl promote "$PID" --readyz "http://127.0.0.1:$NEW/readyz" \
    --timeout "${TIMEOUT:-60s}" --probation "${PROBATION:-10s}" --stop-old || rc=$?

case $rc in
0)
    # --stop-old has already SIGTERMed the old instance and waited for it; make systemd agree.
    systemctl stop "$UNIT@$OLD" 2>/dev/null || true
    echo "deployed $UNIT@$NEW (pid $PID); $UNIT@$OLD stopped"
    ;;
*)
    # 4: never ready, 5: died before the switch, 8: failed its probation (rolled back), ...
    echo "deploy of $UNIT@$NEW failed (zdt-ctl exit $rc); $UNIT@$OLD keeps the port" >&2
    systemctl stop "$UNIT@$NEW" || true
    exit "$rc"
    ;;
esac
