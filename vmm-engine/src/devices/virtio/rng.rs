//! virtio-rnd (entropy device): fills the driver's writable buffers with
//! bytes from getrandom(2).

use super::{poll_fds, Activation, VirtioDevice, TYPE_RNG};
use std::os::fd::AsRawFd;

/// Bytes served per request at most (a guest asking for gigabytes gets a
/// short answer, which the protocol allows).
const MAX_REQUEST: usize = 64 << 10;

#[derive(Default)]
pub struct Rng;

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writing at most buf.len()-done bytes into buf.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        done += r as usize;
    }
    true
}

impl Rng {
    fn serve(act: &mut Activation) -> Result<(), String> {
        let ram = act.ram.clone();
        let q = &mut act.queues[0];
        let mut any = false;
        let mut buf = vec![0u8; MAX_REQUEST];
        while let Some(c) = q.pop(&ram).map_err(|e| e.0)? {
            let want = (c.writable_len() as usize).min(MAX_REQUEST);
            let n = if getrandom(&mut buf[..want]) {
                c.write_at(&ram, 0, &buf[..want])
            } else {
                0
            };
            q.push(&ram, c.head, n as u32).map_err(|e| e.0)?;
            any = true;
        }
        if any && q.needs_notification(&ram) {
            act.irq.queue(0);
        }
        Ok(())
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn run(&mut self, act: &mut Activation) {
        let (stop, notify) = (act.stop.as_raw_fd(), act.notify[0].as_raw_fd());
        let mut broken = false;
        loop {
            if act.should_stop() {
                return;
            }
            super::drain(&act.notify[0]);
            if !broken {
                if let Err(why) = Self::serve(act) {
                    act.broken(&why);
                    broken = true;
                }
            }
            if poll_fds(&[(stop, libc::POLLIN), (notify, libc::POLLIN)], -1)[0] != 0 {
                return;
            }
        }
    }
}
