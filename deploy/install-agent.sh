#!/bin/sh
# Installs, upgrades or removes the Sundial agent on a device.
#
#   install-agent.sh --binary PATH [--coordinator HOST:PORT[,HOST:PORT...]]
#                    (--token-file FILE|- | --token TOKEN) [--name N] [--label k=v]... [--allow-exec PATTERN]...
#                    [--allow-wasm]
#                    [--root DIR]
#   install-agent.sh --uninstall [--purge [--force]] [--binary PATH] [--root DIR]
#
# First install: creates the `sundial` system user, /etc/sundial/agent.toml,
# /var/lib/sundial-agent (0700, owned by sundial), installs the binary,
# enrolls with `sundial-agent join`, then installs and enables
# sundial-agent.service. The service is installed only after enrollment
# succeeded, so a failure leaves no half-installed service behind.
#
# Re-running it on an enrolled device upgrades the binary and restarts the
# service; the agent keeps its identity, tasks and outbox (--coordinator and
# --token are then not needed). --token-file FILE (or - for standard input)
# keeps the token out of `ps` and the shell's history; --token shows it.
#
# --purge deletes the agent's data too; it refuses while the outbox holds
# run records never synced to a coordinator (retire the agent first with
# `sundialctl agent retire`), unless --force.
#
# --root DIR puts every path under DIR and skips useradd/chown/systemctl with
# a message (that is how the tests run it).
set -eu

prog=install-agent.sh
say() { printf '%s: %s\n' "$prog" "$*"; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

binary= coordinator= token= name= root= uninstall=0 purge=0 force=0
labels= allows= allow_wasm=0
# Append a shell-quoted word to a list variable.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
        --coordinator) [ $# -ge 2 ] || die "--coordinator needs HOST:PORT"; coordinator=$2; shift 2 ;;
        --token) [ $# -ge 2 ] || die "--token needs a token"; token=$2; shift 2 ;;
        --token-file) [ $# -ge 2 ] || die "--token-file needs a file (or - for standard input)"
            if [ "$2" = - ]; then
                IFS= read -r token || [ -n "$token" ] || die "--token-file -: no token on standard input"
            else
                [ -r "$2" ] || die "--token-file '$2': cannot read it"
                token=$(head -n 1 "$2")
            fi
            [ -n "$token" ] || die "--token-file '$2': it holds no token"
            shift 2 ;;
        --name) [ $# -ge 2 ] || die "--name needs a name"; name=$2; shift 2 ;;
        --label) [ $# -ge 2 ] || die "--label needs k=v"
            case "$2" in *=*) ;; *) die "--label '$2': expected key=value" ;; esac
            labels="$labels --label $(quote "$2")"; shift 2 ;;
        --allow-exec) [ $# -ge 2 ] || die "--allow-exec needs a pattern"
            allows="$allows $(quote "$2")"; shift 2 ;;
        --allow-wasm) allow_wasm=1; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        --force) force=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
fi
bin_dir=$root/usr/local/bin
bin=$bin_dir/sundial-agent
conf_dir=$root/etc/sundial
conf=$conf_dir/agent.toml
state=$root/var/lib/sundial-agent
unit_dir=$root/etc/systemd/system
unit=$unit_dir/sundial-agent.service
unit_src=$(dirname "$0")/sundial-agent.service
user=sundial

system() {
    # Runs a system-wide step, or says what it skipped under --root.
    if [ -n "$root" ]; then
        say "skipped under --root: $*"
    else
        "$@"
    fi
}

if [ "$uninstall" = 1 ]; then
    # Records never synced would be lost with the data: check first, before
    # anything is removed.
    if [ "$purge" = 1 ] && [ "$force" = 0 ] && [ -f "$state/agent.redb" ]; then
        checker=$bin
        [ -x "$checker" ] || checker=$binary
        [ -n "$checker" ] && [ -x "$checker" ] \
            || die "cannot check the agent's outbox in $state (the agent binary is gone: pass --binary PATH), or pass --force to delete it unchecked"
        left=$("$checker" status --data-dir "$state" -o json 2>/dev/null \
            | sed -n 's/.*"outbox_len": *\([0-9][0-9]*\).*/\1/p' | head -n 1)
        [ -n "$left" ] || die "cannot read the agent's outbox in $state; pass --force to delete it unchecked"
        if [ "$left" -gt 0 ]; then
            die "$left run record(s) in $state were never synced to a coordinator: retire the agent first (sundialctl agent retire NAME) so they reach it, or pass --force to delete them"
        fi
    fi
    if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now sundial-agent.service 2>/dev/null || true
    else
        say "skipped under --root: systemctl disable --now sundial-agent.service"
    fi
    rm -f "$unit" "$bin"
    system systemctl daemon-reload
    if [ "$purge" = 1 ]; then
        rm -rf "$state" "$conf"
        rmdir "$conf_dir" 2>/dev/null || true
        say "removed the agent, its configuration and its data (identity, tasks, outbox)"
    else
        say "removed the agent; kept $conf and $state (use --purge to delete them)"
    fi
    exit 0
fi

[ -n "$binary" ] || die "--binary PATH is required (the sundial-agent executable to install)"
[ -f "$unit_src" ] || die "$unit_src not found: run this script from the deploy/ directory it came in"
[ -f "$binary" ] && [ -x "$binary" ] || die "--binary '$binary' is not an executable file"

enrolled=0
[ -f "$state/agent.pem" ] && [ -f "$state/agent.redb" ] && enrolled=1

if [ "$enrolled" = 0 ]; then
    # Without --coordinator, the addresses the token carries (sdj2 tokens).
    case "$coordinator" in ''|*:*) ;; *) die "--coordinator '$coordinator': expected HOST:PORT[,HOST:PORT...]" ;; esac
    [ -n "$token" ] || die "--token-file FILE (or --token) is required for a first install (create one with: sundialctl token create)"
fi

# The user that runs the agent.
if [ -z "$root" ]; then
    if ! id "$user" >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/sundial-agent --no-create-home \
            --shell /usr/sbin/nologin "$user"
        say "created system user $user"
    fi
else
    say "skipped under --root: useradd --system $user"
fi

# Install the binary atomically (a running agent keeps its old inode).
mkdir -p "$bin_dir"
tmp_bin=$bin_dir/.sundial-agent.new.$$
cp "$binary" "$tmp_bin"
chmod 0755 "$tmp_bin"

if [ "$enrolled" = 1 ]; then
    mv -f "$tmp_bin" "$bin"
    say "upgraded $bin; identity, tasks and outbox in $state are kept"
    if [ -f "$unit" ]; then
        system systemctl daemon-reload
        system systemctl restart sundial-agent.service
    fi
    exit 0
fi

# First install: state directory, enrollment, then config and service.
created_state=0
if [ ! -d "$state" ]; then
    mkdir -p "$state"
    created_state=1
fi
chmod 0700 "$state"
system chown "$user:$user" "$state"

cleanup_failed_join() {
    rm -f "$tmp_bin"
    if [ "$created_state" = 1 ]; then
        rm -rf "$state"
    fi
}

# The token goes in on standard input, so it never shows in `ps`.
join_cmd="$(quote "$tmp_bin") join --token-file - --data-dir $(quote "$state")"
[ -n "$coordinator" ] && join_cmd="$join_cmd --coordinator $(quote "$coordinator")"
[ -n "$name" ] && join_cmd="$join_cmd --name $(quote "$name")"
join_cmd="$join_cmd$labels"
if [ "$allow_wasm" = 1 ]; then join_cmd="$join_cmd --allow-wasm"; fi
if [ -n "$allows" ]; then
    eval "set -- $allows"
    for a in "$@"; do join_cmd="$join_cmd --allow-exec $(quote "$a")"; done
fi

say "enrolling with $coordinator"
if [ -z "$root" ]; then
    run_join() { printf '%s\n' "$token" | runuser -u "$user" -- sh -c "$join_cmd"; }
else
    run_join() { printf '%s\n' "$token" | sh -c "$join_cmd"; }
fi
if ! agent_id=$(run_join); then
    cleanup_failed_join
    die "enrollment failed (see the message above); nothing was installed"
fi
mv -f "$tmp_bin" "$bin"
say "enrolled as $agent_id"

mkdir -p "$conf_dir"
if [ ! -f "$conf" ]; then
    {
        echo "# Sundial agent configuration (see deploy/agent.toml for every key)."
        echo "# Flags given to \`sundial-agent run\` override it."
        echo ""
        echo "# Where the agent keeps its key, certificate and store."
        echo "data_dir = \"$state\""
        echo "# Log filter: error, warn, info, debug, trace."
        echo "log = \"info\""
        echo "# Programs tasks may run are kept in the store from \`join --allow-exec\`;"
        echo "# patterns listed here apply too."
        echo "allow_exec = []"
    } >"$conf"
    chmod 0644 "$conf"
fi

mkdir -p "$unit_dir"
# The packaged unit runs /usr/bin/sundial-agent; this install lives in /usr/local.
sed "s#/usr/bin/sundial-agent#/usr/local/bin/sundial-agent#" "$unit_src" >"$unit"
chmod 0644 "$unit"
system systemctl daemon-reload
system systemctl enable --now sundial-agent.service
say "installed: $bin, $conf, $unit; data in $state"
