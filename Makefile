# vmmfs: build as yourself, install as root.
#
#   make                     release build of the daemon and the tools
#   sudo make install        PREFIX/sbin/vmmfs, PREFIX/bin/bhyve..., man pages,
#                            the systemd unit, sysusers.d and tmpfiles.d entries
#   sudo make uninstall      remove them (the group vmm and /var/lib/vmmfs stay)
#   make deb                 target/debian/vmmfs_*.deb (cargo-deb)
#   sudo make test           every test (scripts/test)
#
# PREFIX (default /usr/local) and DESTDIR (a staging tree) as usual.
PREFIX ?= /usr/local
DESTDIR ?=

all:
	cargo build --release --workspace --bins

install:
	scripts/install --prefix "$(PREFIX)" $(DESTDIR)

uninstall:
	scripts/uninstall --prefix "$(PREFIX)" $(DESTDIR)

deb:
	scripts/package

test:
	scripts/test

.PHONY: all install uninstall deb test
