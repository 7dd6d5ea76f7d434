//! The 16550A UARTs: the register model is rust-vmm's `vm-superio` Serial
//! (reviewed and fuzzed); this module gives it the engine's output
//! semantics, the interrupt as a level and the input limit. Output goes to
//! a descriptor (pipe, file or terminal); input is pushed in by a reader
//! thread. Register offsets come from the guest and are decoded by the
//! crate; offsets past the 8 registers read ones here.

use crate::events::VmEvents;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

/// Receive FIFO depth of a 16550A: the most input the engine queues in a
/// UART (the crate's buffer is larger; the reader thread stays under this).
pub const RX_FIFO: usize = 16;

/// IIR bit 0: no interrupt pending.
const IIR_NONE: u8 = 0x01;

/// The interrupt is a level the platform reads after each access (from the
/// IIR's pending bits), so the crate's edge trigger does nothing.
pub struct LevelOnly;

impl Trigger for LevelOnly {
    type E = ();

    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

/// Where transmitted bytes go. A write blocked on a full pipe is retried
/// after a vCPU kick unless the run is stopping; full non-blocking output
/// drops the byte, as a real line would; after an error output stops.
pub struct Output {
    fd: Option<Arc<OwnedFd>>,
    /// Set when the run stops: a write blocked on a full pipe gives up.
    events: VmEvents,
    broken: bool,
}

impl Output {
    fn emit(&mut self, b: u8) {
        let Some(fd) = &self.fd else { return };
        if self.broken {
            return;
        }
        loop {
            // SAFETY: writing one byte from a valid buffer to a descriptor we own.
            let r = unsafe { libc::write(fd.as_raw_fd(), (&b as *const u8).cast(), 1) };
            if r == 1 {
                return;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // A vCPU kick interrupts a blocked write; the byte is retried
                // unless the VM is stopping (nobody may ever read the pipe).
                Some(libc::EINTR) if !self.events.stopping() => continue,
                Some(libc::EINTR) => return,
                // Non-blocking output that is full: drop, as a real line would.
                Some(libc::EAGAIN) => return,
                _ => {
                    log::debug!("serial output failed, dropping further output: {e}");
                    self.broken = true;
                    return;
                }
            }
        }
    }
}

impl io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for b in buf {
            self.emit(*b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One UART.
pub struct Serial {
    uart: vm_superio::Serial<LevelOnly, NoEvents, Output>,
    /// The level last driven on the IRQ line.
    pub irq_level: bool,
}

impl Serial {
    pub fn new(out: Option<Arc<OwnedFd>>, events: VmEvents) -> Serial {
        let out = Output {
            fd: out,
            events,
            broken: false,
        };
        Serial {
            uart: vm_superio::Serial::new(LevelOnly, out),
            irq_level: false,
        }
    }

    /// Bytes waiting in the receive buffer.
    fn queued(&self) -> usize {
        self.uart.state().in_buffer.len()
    }

    /// Room left in the receive FIFO.
    pub fn rx_space(&self) -> usize {
        RX_FIFO.saturating_sub(self.queued())
    }

    /// Queue bytes from the input descriptor; returns how many were taken.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_space());
        if n == 0 {
            return 0;
        }
        // In loopback mode the crate takes nothing: the line is disconnected.
        self.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Whether the UART wants its interrupt line asserted.
    pub fn interrupt(&self) -> bool {
        self.uart.state().interrupt_identification & IIR_NONE == 0
    }

    /// Guest read of register `off` (0..=7).
    pub fn read(&mut self, off: u16) -> u8 {
        match register(off) {
            Some(o) => self.uart.read(o),
            None => 0xff,
        }
    }

    /// Guest write of register `off` (0..=7).
    pub fn write(&mut self, off: u16, v: u8) {
        if let Some(o) = register(off) {
            // Output errors are handled (and logged) by Output itself.
            let _ = self.uart.write(o, v);
        }
    }
}

/// A register offset the UART has (0..=7).
fn register(off: u16) -> Option<u8> {
    u8::try_from(off).ok().filter(|o| *o < 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IER_RDI: u8 = 0x01;
    const IER_THRI: u8 = 0x02;
    const IIR_THRI: u8 = 0x02;
    const IIR_RDI: u8 = 0x04;
    const LSR_DR: u8 = 0x01;
    const MCR_LOOP: u8 = 0x10;

    #[test]
    fn loopback_and_fifo() {
        let mut s = Serial::new(None, VmEvents::new());
        s.write(4, MCR_LOOP);
        for b in 0..40u8 {
            s.write(0, b);
        }
        assert_eq!(s.read(5) & LSR_DR, LSR_DR);
        // Looped-back bytes fill the crate's (64-byte) buffer, in order.
        for b in 0..40u8 {
            assert_eq!(s.read(0), b);
        }
        assert_eq!(s.read(5) & LSR_DR, 0);
        // Out of range offsets never panic.
        assert_eq!(s.read(8), 0xff);
        s.write(99, 1);
    }

    #[test]
    fn input_is_limited_to_a_16550a_fifo() {
        let mut s = Serial::new(None, VmEvents::new());
        assert_eq!(s.rx_space(), RX_FIFO);
        assert_eq!(s.push_input(&[b'a'; 40]), RX_FIFO);
        assert_eq!(s.rx_space(), 0);
        assert_eq!(s.push_input(b"b"), 0);
        assert_eq!(s.read(0), b'a');
        assert_eq!(s.rx_space(), 1);
    }

    #[test]
    fn output_reaches_the_descriptor() {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut s = Serial::new(Some(Arc::new(w)), VmEvents::new());
        for b in b"hi" {
            s.write(0, *b);
        }
        let mut buf = [0u8; 8];
        // SAFETY: reading into a local buffer from a descriptor we own.
        let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..usize::try_from(n).unwrap()], b"hi");
    }

    #[test]
    fn interrupts_follow_ier() {
        let mut s = Serial::new(None, VmEvents::new());
        assert!(!s.interrupt());
        s.push_input(b"x");
        assert!(!s.interrupt());
        s.write(1, IER_RDI);
        assert!(s.interrupt());
        assert_eq!(s.read(2) & 0x0f, IIR_RDI);
        assert_eq!(s.read(0), b'x');
        assert!(!s.interrupt());
        s.write(1, IER_RDI | IER_THRI);
        assert!(s.interrupt());
        assert_eq!(s.read(2) & 0x0f, IIR_THRI);
        assert!(!s.interrupt());
    }
}
