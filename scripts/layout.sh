# The installed layout, shared by scripts/install, scripts/uninstall and the
# Debian package's check (sourced).

# parse_layout_args [--prefix PREFIX] [DESTDIR]: sets PREFIX and DESTDIR.
parse_layout_args() {
    PREFIX=/usr/local
    DESTDIR=${DESTDIR:-}
    PURGE=0
    while [ $# -gt 0 ]; do
        case $1 in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help)
            echo "usage: $0 [--prefix PREFIX] [DESTDIR]   (PREFIX default /usr/local)"
            exit 0
            ;;
        -*) die "unknown option $1 (usage: $0 [--prefix PREFIX] [DESTDIR])" ;;
        *) DESTDIR=$1; shift ;;
        esac
    done
    case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path" ;;
    esac
    PREFIX=${PREFIX%/}
    [ -n "$PREFIX" ] || PREFIX=/
    DESTDIR=${DESTDIR%/}
}

# layout_files RELEASE_DIR: "SOURCE DEST MODE" lines (DEST without DESTDIR);
# SOURCE "@unit" is the unit, rewritten for PREFIX.
layout_files() {
    local release=$1 t p
    echo "$release/vmmfs $PREFIX/sbin/vmmfs 0755"
    # Each VM's jailed worker; vmmfs finds it beside itself.
    echo "$release/vmm-worker $PREFIX/sbin/vmm-worker 0755"
    for t in bhyve bhyvectl bhyveload; do
        echo "$release/$t $PREFIX/bin/$t 0755"
    done
    echo "$ROOT/man/vmm.4 $PREFIX/share/man/man4/vmm.4 0644"
    for p in vmmfs bhyve bhyvectl bhyveload; do
        echo "$ROOT/man/$p.8 $PREFIX/share/man/man8/$p.8 0644"
    done
    echo "@unit $PREFIX/lib/systemd/system/vmmfs.service 0644"
    echo "$ROOT/packaging/sysusers.d/vmmfs.conf $PREFIX/lib/sysusers.d/vmmfs.conf 0644"
    echo "$ROOT/packaging/tmpfiles.d/vmmfs.conf $PREFIX/lib/tmpfiles.d/vmmfs.conf 0644"
}
