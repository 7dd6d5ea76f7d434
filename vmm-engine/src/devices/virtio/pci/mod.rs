//! The virtio 1.x PCI transport ("modern", non-transitional).
//!
//! BAR 0 (32-bit memory, 16 KiB) holds every structure, each announced by a
//! vendor capability:
//!   0x0000 common configuration      0x1000 ISR status
//!   0x2000 device configuration      0x3000 notify (4 bytes per queue)
//!   0x3800 MSI-X table               0x3c00 MSI-X pending bits
//! Notify writes reach the device thread through one eventfd per queue,
//! registered as a KVM ioeventfd at the notify address while the BAR is
//! decoded (so they never exit to user space); where KVM refuses, the MMIO
//! exit handler signals the same eventfd.

mod activate;
mod common;
mod header;
#[cfg(test)]
mod tests;

use super::irq::{GsiRouter, Interrupt};
use super::queue::QueueConfig;
use super::{Ram, VirtioDevice, F_VERSION_1};
use crate::cast;
use crate::devices::pci::{cfg_bar_addr, cfg_mem_enabled, PciDevice, PciFunction};
use header::{Header, COMMON_LEN, DEVCFG, ISR, MSIX_PBA, MSIX_TABLE, NOTIFY, NOTIFY_MULT};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

pub use header::{Placement, BAR_SIZE};

struct Worker {
    handle: JoinHandle<Box<dyn VirtioDevice>>,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
}

/// One virtio-pci function's transport state.
pub struct VirtioPci {
    vm: Arc<VmFd>,
    name: String,
    dev: Option<Box<dyn VirtioDevice>>,
    worker: Option<Worker>,
    offered: u64,
    config: Vec<u8>,
    dfsel: u32,
    gfsel: u32,
    driver_features: u64,
    status: u8,
    queue_sel: u16,
    queues: Vec<QueueConfig>,
    notify: Vec<Arc<EventFd>>,
    irq: Arc<Interrupt>,
    ram: Arc<Ram>,
    ioevent_at: Option<u64>,
    msix_cap: usize,
}

/// What a function is wired to: the VM, its interrupt routes, guest RAM.
struct Wiring {
    vm: Arc<VmFd>,
    router: Arc<GsiRouter>,
    ram: Arc<Ram>,
}

impl VirtioPci {
    /// Build the PCI function for `dev`, BAR 0 pre-placed at `bar_addr` with
    /// memory decoding on (as firmware would leave it; guests may move it).
    pub fn function(
        dev: Box<dyn VirtioDevice>,
        name: String,
        vm: Arc<VmFd>,
        router: Arc<GsiRouter>,
        ram: Arc<Ram>,
        place: Placement,
    ) -> crate::error::Result<PciFunction> {
        let (mut f, v) = VirtioPci::build(dev, name, Wiring { vm, router, ram }, place)?;
        f.dev = Some(Box::new(v));
        Ok(f)
    }

    /// The function's configuration space and the transport, apart.
    fn build(
        dev: Box<dyn VirtioDevice>,
        name: String,
        w: Wiring,
        place: Placement,
    ) -> crate::error::Result<(PciFunction, VirtioPci)> {
        let Wiring { vm, router, ram } = w;
        let (intx_line, source) = (place.intx_line, place.source);
        let sizes = dev.queue_max_sizes();
        let nq = sizes.len();
        let config = dev.config();
        let Header {
            f,
            vectors,
            msix_cap,
        } = Header::new(dev.device_type(), &place, nq, config.len())?;
        let mut notify = Vec::new();
        for _ in 0..nq {
            notify.push(Arc::new(super::eventfd()?));
        }
        let irq = Arc::new(Interrupt::new(
            vm.clone(),
            router,
            vectors,
            nq,
            intx_line,
            source,
        ));
        let mut v = VirtioPci {
            vm,
            name,
            offered: dev.features() | F_VERSION_1,
            config,
            dev: Some(dev),
            worker: None,
            dfsel: 0,
            gfsel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            queues: sizes.into_iter().map(QueueConfig::new).collect(),
            notify,
            irq,
            ram,
            ioevent_at: None,
            msix_cap,
        };
        let cfg = f.cfg;
        v.config_written(&cfg, f.bar_addr(0), f.mem_enabled());
        Ok((f, v))
    }

    /// The guest wrote configuration space: follow MSI-X control and the BAR.
    pub fn config_written(&mut self, cfg: &[u8; 256], bar: u64, mem_on: bool) {
        let ctrl = cfg[self.msix_cap + 3];
        self.irq
            .set_msix_control(ctrl & 0x80 != 0, ctrl & 0x40 != 0);
        let want = (mem_on && bar != 0).then_some(bar);
        if want == self.ioevent_at {
            return;
        }
        if let Some(old) = self.ioevent_at.take() {
            for (q, e) in self.notify.iter().enumerate() {
                let a = IoEventAddress::Mmio(old + NOTIFY + NOTIFY_MULT * q as u64);
                let _ = self.vm.unregister_ioevent(e, &a, NoDatamatch);
            }
        }
        if let Some(new) = want {
            for (q, e) in self.notify.iter().enumerate() {
                let a = IoEventAddress::Mmio(new + NOTIFY + NOTIFY_MULT * q as u64);
                if let Err(err) = self.vm.register_ioevent(e, &a, NoDatamatch) {
                    // Notify writes then come as MMIO exits; same eventfd.
                    log::debug!("{}: ioeventfd at {new:#x}: {err}", self.name);
                }
            }
            self.ioevent_at = Some(new);
        }
    }

    pub fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let len = data.len() as u64;
        match off {
            o if o + len <= COMMON_LEN => {
                let s = self.common_snapshot();
                data.copy_from_slice(&s[cast::usize_from(o)..cast::usize_from(o + len)]);
            }
            ISR => {
                if let Some(b) = data.first_mut() {
                    *b = self.irq.read_isr();
                }
            }
            o if o >= DEVCFG && o - DEVCFG + len <= self.config.len() as u64 => {
                let s = cast::usize_from(o - DEVCFG);
                data.copy_from_slice(&self.config[s..s + data.len()]);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.irq.table_read(o - MSIX_TABLE, data),
            o if o >= MSIX_PBA => self.irq.pba_read(o - MSIX_PBA, data),
            _ => {}
        }
    }

    pub fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let len = data.len() as u64;
        match off {
            o if o + len <= COMMON_LEN => self.common_write(o, data),
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                // Reached only where no ioeventfd took the write.
                let q = ((o - NOTIFY) / NOTIFY_MULT) as usize;
                if let Some(e) = self.notify.get(q) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.irq.table_write(o - MSIX_TABLE, data),
            _ => log::debug!("{}: ignored BAR write at {off:#x}", self.name),
        }
    }
}

impl PciDevice for VirtioPci {
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        VirtioPci::bar_read(self, bar, off, data);
    }

    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        VirtioPci::bar_write(self, bar, off, data);
    }

    fn config_written(&mut self, cfg: &[u8; 256]) {
        VirtioPci::config_written(self, cfg, cfg_bar_addr(cfg, 0), cfg_mem_enabled(cfg));
    }

    fn shutdown(&mut self) {
        VirtioPci::shutdown(self);
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.stop_worker();
        if let Some(at) = self.ioevent_at.take() {
            for (q, e) in self.notify.iter().enumerate() {
                let a = IoEventAddress::Mmio(at + NOTIFY + NOTIFY_MULT * q as u64);
                let _ = self.vm.unregister_ioevent(e, &a, NoDatamatch);
            }
        }
    }
}
