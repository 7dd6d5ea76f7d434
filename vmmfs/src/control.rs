//! The administrator's channel to a running daemon: a root-only Unix socket
//! in the state directory, one request line per connection.
//!
//! Requests: `allow PID vmm|ppt`, `revoke PID vmm|ppt`, `list`.
//! Replies: lines, the last one `ok` or `error MESSAGE`.

use crate::engine::Engine;
use crate::jails::Jails;
use crate::service::Service;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Socket path inside the state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// How often jails are checked for their end when no request comes.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Bind the socket (mode 0600) and serve requests on a thread; between
/// requests, drop the grants of jails that ended.
pub fn serve<E: Engine>(service: Arc<Service<E>>, state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || loop {
            use std::os::fd::AsFd;
            let mut fds = [nix::poll::PollFd::new(
                listener.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let timeout = nix::poll::PollTimeout::try_from(SWEEP_EVERY)
                .unwrap_or(nix::poll::PollTimeout::MAX);
            if let Ok(0) = nix::poll::poll(&mut fds, timeout) {
                service.sweep_grants();
                continue;
            }
            while let Ok((conn, _)) = listener.accept() {
                // One short request; a client that does not send it in time
                // is dropped rather than blocking the next administrator.
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(2)));
                if let Err(e) = handle(&service, conn) {
                    log::warn!("control connection: {e}");
                }
            }
        })?;
    Ok(path)
}

fn peer_is_host_root(conn: &UnixStream, jails: &Jails) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len: libc::socklen_t =
        const { vmm_engine::cast::const_u32(std::mem::size_of::<libc::ucred>() as u64) };
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0
        && cred.uid == 0
        && u32::try_from(cred.pid).is_ok_and(|pid| jails.of_pid(pid).is_ok_and(|j| j.is_host()))
}

fn handle<E: Engine>(service: &Service<E>, conn: UnixStream) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    if !peer_is_host_root(&conn, service.jails()) {
        return writeln!(
            out,
            "error only root on the host may change jail permissions"
        );
    }
    let mut line = String::new();
    BufReader::new(conn.take_limited()).read_line(&mut line)?;
    let reply = match execute(service, line.trim_end()) {
        Ok(text) => format!("{text}ok\n"),
        Err(e) => format!("error {e}\n"),
    };
    out.write_all(reply.as_bytes())
}

trait TakeLimited {
    fn take_limited(self) -> std::io::Take<UnixStream>;
}

impl TakeLimited for UnixStream {
    /// Requests are one short line; a client cannot make us buffer more.
    fn take_limited(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, 256)
    }
}

fn grant_line(ns: u64, g: crate::state::Grants) -> String {
    format!(
        "jail ns={ns} allow.vmm={} allow.vmm_ppt={}\n",
        g.vmm as u8, g.ppt as u8
    )
}

fn execute<E: Engine>(service: &Service<E>, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["list"] => Ok(service
            .jail_grants()
            .into_iter()
            .map(|(ns, g)| grant_line(ns, g))
            .collect()),
        [verb @ ("allow" | "revoke"), pid, what @ ("vmm" | "ppt")] => {
            let pid: u32 = pid.parse().map_err(|_| format!("bad pid '{pid}'"))?;
            let allow = *verb == "allow";
            let (ns, g) = service.set_grants(pid, |g| match (*what, allow) {
                ("vmm", true) => g.vmm = true,
                // Revoking allow.vmm takes allow.vmm_ppt with it: passthrough needs both.
                ("vmm", false) => *g = Default::default(),
                (_, true) => {
                    g.vmm = true;
                    g.ppt = true;
                }
                (_, false) => g.ppt = false,
            })?;
            Ok(grant_line(ns, g))
        }
        _ => Err("usage: allow PID vmm|ppt | revoke PID vmm|ppt | list".into()),
    }
}

/// Client side: send one request to the daemon and print its reply.
pub fn request(state_dir: &Path, line: &str) -> Result<String, String> {
    let path = socket_path(state_dir);
    let mut conn = UnixStream::connect(&path)
        .map_err(|e| format!("cannot reach the vmmfs daemon at {}: {e}", path.display()))?;
    writeln!(conn, "{line}").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).map_err(|e| e.to_string())?;
    match reply
        .rsplit_once('\n')
        .map(|(body, _)| body.rsplit_once('\n').unwrap_or(("", body)))
    {
        Some((body, "ok")) => Ok(if body.is_empty() {
            String::new()
        } else {
            format!("{body}\n")
        }),
        Some((_, err)) => Err(err.strip_prefix("error ").unwrap_or(err).to_string()),
        None => Err("no reply from the daemon".into()),
    }
}
