//! A 16550A UART: enough of it for firmware, boot loaders and Linux's 8250
//! driver. Output goes to a descriptor (pipe, file or terminal); input is
//! pushed in by a reader thread. Register offsets come from the guest, so
//! every access is decoded defensively.

use crate::events::VmEvents;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Receive FIFO depth of a 16550A.
pub const RX_FIFO: usize = 16;

const IER_RDI: u8 = 0x01; // received data available
const IER_THRI: u8 = 0x02; // transmitter holding register empty
const IIR_NONE: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;

/// One UART.
pub struct Serial {
    dll: u8,
    dlm: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    fcr: u8,
    scr: u8,
    thr_pending: bool,
    rx: VecDeque<u8>,
    out: Option<Arc<OwnedFd>>,
    /// Set when the run stops: a write blocked on a full pipe gives up.
    events: VmEvents,
    /// The level last driven on the IRQ line.
    pub irq_level: bool,
    out_broken: bool,
}

impl Serial {
    pub fn new(out: Option<Arc<OwnedFd>>, events: VmEvents) -> Serial {
        Serial {
            dll: 12, // 9600 baud, as firmware leaves it
            dlm: 0,
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            fcr: 0,
            scr: 0,
            thr_pending: false,
            rx: VecDeque::with_capacity(RX_FIFO),
            out,
            events,
            irq_level: false,
            out_broken: false,
        }
    }

    /// Room left in the receive FIFO.
    pub fn rx_space(&self) -> usize {
        RX_FIFO.saturating_sub(self.rx.len())
    }

    /// Queue bytes from the input descriptor; returns how many were taken.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_space());
        self.rx.extend(&bytes[..n]);
        n
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fcr & 1 != 0 { IIR_FIFO } else { 0 };
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI | fifo
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI | fifo
        } else {
            IIR_NONE | fifo
        }
    }

    /// Whether the UART wants its interrupt line asserted.
    pub fn interrupt(&self) -> bool {
        self.iir() & IIR_NONE == 0
    }

    fn emit(&mut self, b: u8) {
        if self.mcr & MCR_LOOP != 0 {
            if self.rx.len() < RX_FIFO {
                self.rx.push_back(b);
            }
            return;
        }
        let Some(fd) = &self.out else { return };
        if self.out_broken {
            return;
        }
        loop {
            // SAFETY: writing one byte from a valid buffer to a descriptor we own.
            let r = unsafe { libc::write(fd.as_raw_fd(), (&b as *const u8).cast(), 1) };
            if r == 1 {
                return;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A vCPU kick interrupts a blocked write; the byte is retried
                // unless the VM is stopping (nobody may ever read the pipe).
                Some(libc::EINTR) if !self.events.stopping() => continue,
                Some(libc::EINTR) => return,
                // Non-blocking output that is full: drop, as a real line would.
                Some(libc::EAGAIN) => return,
                _ => {
                    log::debug!("serial output failed, dropping further output: {e}");
                    self.out_broken = true;
                    return;
                }
            }
        }
    }

    /// Guest read of register `off` (0..=7).
    pub fn read(&mut self, off: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match off {
            0 if dlab => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let v = self.iir();
                // Reading IIR acknowledges a THR-empty interrupt.
                if v & 0x0f == IIR_THRI {
                    self.thr_pending = false;
                }
                v
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
                dr | LSR_THRE | LSR_TEMT
            }
            6 => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = self.mcr;
                    ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                } else {
                    0xb0 // DCD, DSR, CTS: a connected line
                }
            }
            7 => self.scr,
            _ => 0xff,
        }
    }

    /// Guest write of register `off` (0..=7).
    pub fn write(&mut self, off: u16, v: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match off {
            0 if dlab => self.dll = v,
            0 => {
                self.emit(v);
                // Transmission is instantaneous: THR is empty again at once.
                self.thr_pending = true;
            }
            1 if dlab => self.dlm = v,
            1 => {
                let newly_thri = v & IER_THRI != 0 && self.ier & IER_THRI == 0;
                self.ier = v & 0x0f;
                if newly_thri {
                    self.thr_pending = true;
                }
            }
            2 => {
                if v & 0x02 != 0 {
                    self.rx.clear();
                }
                self.fcr = v & 0xc9;
            }
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {} // LSR and MSR are read-only
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_fifo() {
        let mut s = Serial::new(None, VmEvents::new());
        s.write(4, MCR_LOOP);
        for b in 0..40u8 {
            s.write(0, b);
        }
        assert_eq!(s.read(5) & LSR_DR, LSR_DR);
        for b in 0..RX_FIFO as u8 {
            assert_eq!(s.read(0), b);
        }
        assert_eq!(s.read(5) & LSR_DR, 0);
        // Out of range offsets never panic.
        assert_eq!(s.read(8), 0xff);
        s.write(99, 1);
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
