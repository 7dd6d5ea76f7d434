# Shared by scripts/setup, run, test, install, uninstall and package
# (sourced, not run). Sets ROOT (the repository) and defines helpers.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The vmmfs layout: where `scripts/run` keeps the daemon.
VMMFS_MOUNT=${VMMFS_MOUNT:-/run/vmmfs}
VMMFS_STATE=${VMMFS_STATE:-/var/lib/vmmfs}
VMMFS_LOG=${VMMFS_LOG:-/var/log/vmmfs.log}

say() { echo "${PROG:-vmmfs}: $*"; }
die() {
    echo "${PROG:-vmmfs}: $*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0 $*)"
}

# True when systemd is PID 1 (systemctl can start units).
systemd_running() {
    [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]
}

# The account that builds: the owner of the repository (so that `sudo
# scripts/run` in a user's clone never leaves root-owned files there), or
# root when root owns it (CI).
build_user() {
    stat -c %U "$ROOT"
}

build_home() {
    getent passwd "$(build_user)" | cut -d: -f6
}

# Run a command as the build user, in the repository, with the toolchain
# that user installed (rustup puts it in ~/.cargo/bin) first in PATH.
as_builder() {
    local user home path
    user=$(build_user)
    home=$(build_home)
    path="$home/.cargo/bin:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    if [ "$user" = "$(id -un)" ]; then
        (cd "$ROOT" && PATH="$path" "$@")
    else
        # CARGO_HOME/RUSTUP_HOME of the caller (root) must not leak into the
        # user's build.
        (cd "$ROOT" && runuser -u "$user" -- env -u CARGO_HOME -u RUSTUP_HOME \
            HOME="$home" USER="$user" LOGNAME="$user" PATH="$path" "$@")
    fi
}

# The rust-version of Cargo.toml (the oldest toolchain that builds the workspace).
rust_version() {
    sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$ROOT/Cargo.toml" | head -n 1
}

# version_ge A B: A >= B for dotted versions.
version_ge() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$2" ]
}

# Check that the build user has a Rust toolchain at least rust-version.
check_toolchain() {
    local want have rustc user
    want=$(rust_version)
    user=$(build_user)
    rustc=$(as_builder sh -c 'command -v rustc' 2>/dev/null || true)
    if [ -z "$rustc" ] || ! as_builder sh -c 'command -v cargo' >/dev/null 2>&1; then
        die "no Rust toolchain for $user: install Rust $want or newer with rustup (https://rustup.rs) as $user, then run this again (Debian 12's rustc 1.63 is too old)"
    fi
    have=$(as_builder rustc --version | awk '{print $2}')
    have=${have%%-*}
    if ! version_ge "$have" "$want"; then
        die "$rustc is Rust $have; vmmfs needs $want or newer (Cargo.toml rust-version): as $user run 'rustup update stable' (or install rustup: https://rustup.rs)"
    fi
    say "Rust $have for $user ($rustc), needs $want: ok"
}

# /dev/kvm and /dev/fuse; each missing one is named with what to do.
check_devices() {
    local missing=0
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    [ -e /dev/kvm ] || modprobe kvm 2>/dev/null || true
    if [ ! -c /dev/kvm ]; then
        echo "${PROG:-vmmfs}: /dev/kvm is missing: this machine cannot run virtual machines (enable virtualization in the firmware or the hypervisor, then: modprobe kvm_intel or kvm_amd)" >&2
        missing=1
    fi
    if [ ! -c /dev/fuse ]; then
        echo "${PROG:-vmmfs}: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2
        missing=1
    fi
    [ "$missing" = 0 ] || exit 1
    say "/dev/kvm and /dev/fuse present"
}

# Debian packages not installed, of those named.
missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# Install Debian packages that are missing (quietly).
ensure_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -gt 0 ] || return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "cannot install ${missing[*]} (apt-get install ${missing[*]})"
    fi
}

# The vmm group (sysusers.d entry when systemd-sysusers exists).
ensure_group() {
    getent group vmm >/dev/null && return 0
    if command -v systemd-sysusers >/dev/null && [ -f "$ROOT/packaging/sysusers.d/vmmfs.conf" ]; then
        systemd-sysusers "$ROOT/packaging/sysusers.d/vmmfs.conf" >/dev/null 2>&1 || true
    fi
    getent group vmm >/dev/null || groupadd --system vmm
    say "created group vmm"
}

# The PID of the daemon holding the state directory's lock, if any.
daemon_pid() {
    local lock=$VMMFS_STATE/lock pid
    [ -f "$lock" ] || return 1
    # The lock is held while a daemon runs; taking it here means none does.
    if flock -n "$lock" true 2>/dev/null; then
        return 1
    fi
    pid=$(head -n 1 "$lock" 2>/dev/null | tr -dc 0-9)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# The number of virtual machines the daemon on the mount serves.
vm_count() {
    local n
    n=$(find "$VMMFS_MOUNT/vmm" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "${n:-0}"
}

# Remove /dev links into MOUNT that nothing serves any more.
remove_dangling_links() {
    local name link
    for name in vmmctl vmm vmm.io vmm.sock; do
        link=/dev/$name
        if [ -L "$link" ] && [ "$(readlink "$link")" = "$VMMFS_MOUNT/$name" ] && ! [ -e "$link" ]; then
            rm -f "$link"
        fi
    done
}
