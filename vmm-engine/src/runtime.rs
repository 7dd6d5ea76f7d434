//! The threads of one run: a thread per vCPU, the halt watchdog and a
//! reader per serial input. Started by the builder, stopped and joined
//! (taking the vCPUs back) by whoever holds the command lock.

use crate::cast;
use crate::command::ComPort;
use crate::config::SerialFds;
use crate::error::{Error, Result};
use crate::threads::{self, ThreadKind};
use crate::vcpu::{self, RunCtx, Vcpu};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Threads of one run.
pub(crate) struct Runtime {
    pub(crate) ctx: Arc<RunCtx>,
    vcpus: Vec<JoinHandle<Vcpu>>,
    helpers: Vec<JoinHandle<()>>,
}

impl Runtime {
    /// Stop every thread and take the vCPUs back. Returns whether this call
    /// stopped the guest (false: it had already exited by itself).
    pub(crate) fn stop(mut self, out: &mut Vec<Vcpu>) -> bool {
        let first = self.ctx.stop();
        for h in self.vcpus.drain(..) {
            match h.join() {
                Ok(v) => out.push(v),
                Err(_) => log::error!("a vCPU thread panicked; its vCPU is lost"),
            }
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
        // Device threads touch guest RAM: they end before anything can change it.
        self.ctx.platform.shutdown_devices();
        out.sort_by_key(|v| v.id);
        first
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.vcpus.is_empty() || !self.helpers.is_empty() {
            let mut v = Vec::new();
            let rt = Runtime {
                ctx: self.ctx.clone(),
                vcpus: std::mem::take(&mut self.vcpus),
                helpers: std::mem::take(&mut self.helpers),
            };
            rt.stop(&mut v);
        }
    }
}

impl Runtime {
    /// Start a thread per vCPU of `vcpus` (vCPU `i` as `vcpu{i}`), the
    /// watchdog and the serial readers. If one cannot start, the others
    /// are stopped and the vCPUs given back with the error.
    pub(crate) fn start(
        ctx: Arc<RunCtx>,
        vcpus: Vec<Vcpu>,
        run_size: usize,
        serial: &[Option<SerialFds>; 4],
    ) -> std::result::Result<Runtime, (Error, Vec<Vcpu>)> {
        let mut rt = Runtime {
            ctx,
            vcpus: Vec::new(),
            helpers: Vec::new(),
        };
        if let Err(e) = rt.spawn_threads(vcpus, run_size, serial) {
            let mut back = Vec::new();
            rt.stop(&mut back);
            return Err((e, back));
        }
        Ok(rt)
    }

    fn spawn_threads(
        &mut self,
        vcpus: Vec<Vcpu>,
        run_size: usize,
        serial: &[Option<SerialFds>; 4],
    ) -> Result<()> {
        for (i, v) in vcpus.into_iter().enumerate() {
            let c = self.ctx.clone();
            // A vCPU moved into a closure that failed to start is gone; KVM
            // cannot recreate it, so this VM can only be destroyed then.
            let h = spawn(format!("vcpu{i}"), ThreadKind::Vcpu, move || {
                vcpu::vcpu_thread(v, i, run_size, c)
            })?;
            self.vcpus.push(h);
        }
        let c = self.ctx.clone();
        let h = spawn("vcpu-watchdog".into(), ThreadKind::Helper, move || {
            vcpu::watchdog_thread(c)
        })?;
        self.helpers.push(h);
        for (i, s) in serial.iter().enumerate() {
            let Some(s) = s else { continue };
            let c = self.ctx.clone();
            let input = s.input.clone();
            let port = ComPort::ALL[i];
            let h = spawn(format!("com{}-in", i + 1), ThreadKind::Helper, move || {
                serial_reader(input, port, c)
            })?;
            self.helpers.push(h);
        }
        Ok(())
    }
}

/// Start a named engine thread of `kind`.
pub(crate) fn spawn<T: Send + 'static>(
    name: String,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            threads::started(kind);
            f()
        })
        .map_err(|e| Error::io("spawn thread", e))
}

/// Copy bytes from a serial input descriptor into the UART until the run
/// stops or the input ends.
fn serial_reader(input: Arc<OwnedFd>, port: ComPort, ctx: Arc<RunCtx>) {
    let mut buf = [0u8; crate::devices::serial::RX_FIFO];
    loop {
        if ctx.stopping() {
            return;
        }
        let space = ctx.platform.serial_space(port);
        let mut fds = [
            libc::pollfd {
                fd: ctx.stop_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // With a full FIFO only wait for stop, briefly, then look again.
        let (n, timeout) = if space == 0 { (1, 2) } else { (2, -1) };
        // SAFETY: fds is a valid array of n pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if n == 1 || fds[1].revents == 0 {
            continue;
        }
        if fds[1].revents & libc::POLLNVAL != 0 {
            return;
        }
        let want = space.min(buf.len());
        // SAFETY: reading at most `want` bytes into buf.
        let got = unsafe { libc::read(input.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        match got {
            0 => return, // end of input
            n if n > 0 => {
                ctx.platform.serial_input(port, &buf[..cast::count(n)]);
            }
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    _ => {
                        log::debug!("serial input: {e}");
                        return;
                    }
                }
            }
        }
    }
}
