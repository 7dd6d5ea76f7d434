//! The administrator's channel to a running daemon: a root-only Unix socket
//! in the state directory, one request line per connection.
//!
//! Requests: `allow PID vmm|ppt`, `revoke PID vmm|ppt`, `list`.
//! Replies: lines, the last one `ok` or `error MESSAGE`.

use crate::creds::{pid_namespace, JailId};
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

/// Bind the socket (mode 0600) and serve requests on a thread.
pub fn serve(service: Arc<Service>, state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = handle(&service, conn) {
                    log::warn!("control connection: {e}");
                }
            }
        })?;
    Ok(path)
}

fn peer_is_host_root(conn: &UnixStream, host: JailId) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
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
    rc == 0 && cred.uid == 0 && pid_namespace(cred.pid as u32).is_ok_and(|j| j == host)
}

fn handle(service: &Service, conn: UnixStream) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    if !peer_is_host_root(&conn, service.registry().host()) {
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

fn execute(service: &Service, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["list"] => Ok(service
            .jails()
            .iter()
            .map(|(j, g)| {
                format!(
                    "jail ns={} allow.vmm={} allow.vmm_ppt={}\n",
                    j.0, g.vmm as u8, g.ppt as u8
                )
            })
            .collect()),
        [verb @ ("allow" | "revoke"), pid, what @ ("vmm" | "ppt")] => {
            let pid: u32 = pid.parse().map_err(|_| format!("bad pid '{pid}'"))?;
            let jail = pid_namespace(pid).map_err(|e| format!("pid {pid}: {e}"))?;
            if jail == service.registry().host() {
                return Err(
                    "that process is not in a jail (it shares the host's PID namespace)".into(),
                );
            }
            let allow = *verb == "allow";
            let g = service
                .set_grants(jail, |g| match (*what, allow) {
                    ("vmm", true) => g.vmm = true,
                    // Revoking allow.vmm takes allow.vmm_ppt with it: passthrough needs both.
                    ("vmm", false) => *g = Default::default(),
                    (_, true) => {
                        g.vmm = true;
                        g.ppt = true;
                    }
                    (_, false) => g.ppt = false,
                })
                .map_err(|e| format!("saving state: {e}"))?;
            log::info!(
                "jail {}: allow.vmm={} allow.vmm_ppt={}",
                jail.0,
                g.vmm,
                g.ppt
            );
            Ok(format!(
                "jail ns={} allow.vmm={} allow.vmm_ppt={}\n",
                jail.0, g.vmm as u8, g.ppt as u8
            ))
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
