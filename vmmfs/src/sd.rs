//! Running under systemd: readiness (`Type=notify`) and logging to the
//! journal with priorities.
//!
//! When standard error is the journal's stream (`$JOURNAL_STREAM` names its
//! device and inode, see systemd.exec(5)), every line is written as
//! `<PRIORITY>text`, the prefix of sd-daemon(3): the journal stores the
//! priority and adds its own timestamp. Anywhere else the lines keep
//! env_logger's format (timestamp, level, target).

use std::io::Write;
use std::os::fd::AsFd;

/// The sd-daemon(3) priority of a log level (syslog numbers).
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether `journal_stream` (the value of `$JOURNAL_STREAM`, "DEV:INODE")
/// names the file open on `fd`.
fn is_stream(journal_stream: &str, fd: impl AsFd) -> bool {
    let Some((dev, ino)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Whether standard error goes to the journal.
pub fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|v| is_stream(&v, std::io::stderr()))
}

/// One journal line: `<PRIORITY>text`, continuation lines prefixed too.
pub fn journal_line(level: log::Level, text: &str) -> String {
    let p = priority(level);
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.split('\n') {
        out.push_str(&format!("<{p}>{line}\n"));
    }
    out
}

/// Set up logging: level from `$RUST_LOG` (default `info`); journal format
/// when standard error is the journal.
pub fn init_logging() {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if stderr_is_journal() {
        b.format(|buf, record| {
            buf.write_all(journal_line(record.level(), &record.args().to_string()).as_bytes())
        });
    }
    b.init();
}

/// Tell the service manager the daemon is ready (no-op without
/// `$NOTIFY_SOCKET`). Called once the mount, vmm.sock and the /dev links
/// are in place.
pub fn ready(status: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let state = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ];
    if let Err(e) = sd_notify::notify(&state) {
        log::warn!("cannot notify the service manager: {e}");
    }
}

/// Tell the service manager the daemon is stopping.
pub fn stopping() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn priorities_are_syslog_numbers() {
        assert_eq!(journal_line(log::Level::Error, "x"), "<3>x\n");
        assert_eq!(journal_line(log::Level::Warn, "x"), "<4>x\n");
        assert_eq!(journal_line(log::Level::Info, "a\nb"), "<6>a\n<6>b\n");
        assert_eq!(journal_line(log::Level::Debug, "x"), "<7>x\n");
    }

    #[test]
    fn journal_stream_matches_only_its_own_file() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let st = nix::sys::stat::fstat(&f).unwrap();
        assert!(is_stream(&format!("{}:{}", st.st_dev, st.st_ino), &f));
        assert!(!is_stream(&format!("{}:{}", st.st_dev, st.st_ino + 1), &f));
        assert!(!is_stream("garbage", &f));
        assert!(!is_stream("", &f));
    }

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("vmmfs-sd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // Only this test touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready("mounted");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
        assert!(msg.lines().any(|l| l == "STATUS=mounted"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
