//! Readiness as systemd's Type=notify sees it: READY=1 arrives on
//! $NOTIFY_SOCKET only once the mount and vmm.sock are in place; STOPPING=1
//! on SIGTERM; with $JOURNAL_STREAM naming its standard error, log lines
//! carry a syslog priority and no timestamp.
//!
//! Needs root, /dev/fuse and /dev/kvm (skipped otherwise, a failure in CI).

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

fn usable() -> bool {
    use test_support::Need;
    test_support::require(
        "notify tests",
        &[
            Need::Root,
            Need::Device("/dev/fuse"),
            Need::Device("/dev/kvm"),
        ],
    )
}

fn group() -> &'static str {
    test_support::vmm_group()
}

#[test]
fn ready_after_the_mount_and_journal_priorities() {
    if !usable() {
        return;
    }
    let base = std::env::temp_dir().join(format!("vmmfs-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (mnt, state) = (base.join("mnt"), base.join("state"));
    std::fs::create_dir_all(&mnt).unwrap();
    let notify = base.join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = base.join("log");
    let err = std::fs::File::create(&log).unwrap();
    let meta = err.metadata().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmfs"))
        .args(["--group", group(), "--state-dir"])
        .arg(&state)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &notify)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start vmmfs");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Checked at once: everything READY promises is already there.
    let vmmctl = mnt.join("vmmctl").exists();
    let socket = mnt.join("vmm.sock").exists();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(vmmctl && socket, "READY=1 before the mount or vmm.sock");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(test_support::pid_t(child.id()), libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("no STOPPING=1");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l.starts_with("<6>") || l.starts_with("<4>"), "{l}");
        // env_logger's own format starts with "[2026-...".
        assert!(!l.contains("Z INFO") && !l[3..].starts_with('['), "{l}");
    }
    assert!(
        lines.iter().any(|l| l.contains("vmmfs mounted on")),
        "{text}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}
