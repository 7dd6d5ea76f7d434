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

use super::irq::{GsiRouter, Interrupt, NO_VECTOR};
use super::queue::QueueConfig;
use super::{
    drain, Activation, Ram, VirtioDevice, F_VERSION_1, S_DRIVER_OK, S_FEATURES_OK,
    VIRTIO_PCI_DEVICE_BASE, VIRTIO_VENDOR,
};
use crate::cast;
use crate::devices::pci::{cfg_bar_addr, cfg_mem_enabled, PciDevice, PciFunction};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

pub const BAR_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const COMMON_BYTES: usize = cast::usize_from(COMMON_LEN);
const ISR: u64 = 0x1000;
const DEVCFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULT: u64 = 4;
const MSIX_TABLE: u64 = 0x3800;
const MSIX_PBA: u64 = 0x3c00;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

struct Worker {
    handle: JoinHandle<Box<dyn VirtioDevice>>,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
}

/// Where a function starts out: BAR 0 address, INTx pin (0 = INTA) and
/// line, and its index among the VM's devices (INTx sharing bookkeeping).
pub struct Placement {
    pub bar_addr: u32,
    pub intx_pin: u8,
    pub intx_line: u32,
    pub source: u32,
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

fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        super::TYPE_NET => (0x02, 0x00),
        super::TYPE_BLOCK => (0x01, 0x00),
        super::TYPE_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let mut c = vec![0x09, 0, 16, cfg_type, 0, 0, 0, 0];
    // Offsets and lengths of structures inside the 16 KiB BAR.
    c.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
    c.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_le_bytes());
    if let Some(m) = extra {
        c[2] = 20;
        c.extend_from_slice(&m.to_le_bytes());
    }
    c
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
        let (mut f, v) = VirtioPci::build(dev, name, vm, router, ram, place)?;
        f.dev = Some(Box::new(v));
        Ok(f)
    }

    /// The function's configuration space and the transport, apart.
    fn build(
        dev: Box<dyn VirtioDevice>,
        name: String,
        vm: Arc<VmFd>,
        router: Arc<GsiRouter>,
        ram: Arc<Ram>,
        place: Placement,
    ) -> crate::error::Result<(PciFunction, VirtioPci)> {
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

    fn common_snapshot(&self) -> [u8; COMMON_BYTES] {
        let mut b = [0u8; COMMON_BYTES];
        let mut put = |off: usize, v: u64, n: usize| {
            b[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
        };
        let half = |x: u64, sel: u32| match sel {
            0 => x & 0xffff_ffff,
            1 => x >> 32,
            _ => 0,
        };
        put(0x00, u64::from(self.dfsel), 4);
        put(0x04, half(self.offered, self.dfsel), 4);
        put(0x08, u64::from(self.gfsel), 4);
        put(0x0c, half(self.driver_features, self.gfsel), 4);
        put(0x10, u64::from(self.irq.config_vector()), 2);
        put(0x12, self.queues.len() as u64, 2);
        let mut status = self.status;
        if self.irq.broken() {
            status |= super::S_NEEDS_RESET;
        }
        put(0x14, u64::from(status), 1);
        put(0x15, 0, 1);
        put(0x16, u64::from(self.queue_sel), 2);
        let q = usize::from(self.queue_sel);
        if let Some(c) = self.queues.get(q) {
            put(0x18, u64::from(c.size), 2);
            put(0x1a, u64::from(self.irq.queue_vector(q)), 2);
            put(0x1c, u64::from(c.enabled), 2);
            put(0x1e, q as u64, 2);
            put(0x20, c.desc, 8);
            put(0x28, c.avail, 8);
            put(0x30, c.used, 8);
        }
        b
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut v = 0u64;
        for (i, x) in data.iter().enumerate().take(8) {
            v |= u64::from(*x) << (8 * i);
        }
        let live = self.status & S_DRIVER_OK != 0;
        let q = usize::from(self.queue_sel);
        let vectors = self.irq.vectors() as u64;
        let vector = |v: u64| {
            if v < vectors {
                u16::try_from(v).unwrap_or(NO_VECTOR)
            } else {
                NO_VECTOR
            }
        };
        let set_half = |x: &mut u64, v: u64, high: bool| {
            let v = v & 0xffff_ffff;
            *x = if high {
                (*x & 0xffff_ffff) | (v << 32)
            } else {
                (*x & !0xffff_ffff) | v
            };
        };
        match (off, data.len()) {
            (0x00, 4) => self.dfsel = cast::low_u32(v),
            (0x08, 4) => self.gfsel = cast::low_u32(v),
            (0x0c, 4) if self.status & S_FEATURES_OK == 0 => match self.gfsel {
                0 => set_half(&mut self.driver_features, v, false),
                1 => set_half(&mut self.driver_features, v, true),
                _ => {}
            },
            (0x10, 2) => self.irq.set_config_vector(vector(v)),
            (0x14, 1) => self.status_write(cast::low_u8(v)),
            (0x16, 2) => self.queue_sel = cast::low_u16(v),
            _ if live || q >= self.queues.len() => {
                log::debug!("{}: ignored common write {off:#x}", self.name);
            }
            (0x18, 2) => self.queues[q].size = cast::low_u16(v),
            (0x1a, 2) => self.irq.set_queue_vector(q, vector(v)),
            (0x1c, 2) => self.queues[q].enabled |= v == 1,
            (0x20..=0x37, 4 | 8) if off.is_multiple_of(4) => {
                let c = &mut self.queues[q];
                let field = match (off - 0x20) / 8 {
                    0 => &mut c.desc,
                    1 => &mut c.avail,
                    _ => &mut c.used,
                };
                if data.len() == 8 {
                    *field = v;
                } else {
                    set_half(field, v, off % 8 == 4);
                }
            }
            _ => log::debug!(
                "{}: ignored common write {off:#x} size {}",
                self.name,
                data.len()
            ),
        }
    }

    fn status_write(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v | old; // bits are only ever set until a reset
        if new & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                log::debug!(
                    "{}: refused features {:#x} (offered {:#x})",
                    self.name,
                    self.driver_features,
                    self.offered
                );
                new &= !S_FEATURES_OK;
            }
        }
        self.status = new;
        if new & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
            if let Err(why) = self.activate() {
                log::warn!("{}: cannot start: {why}", self.name);
                self.irq.needs_reset();
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.status & S_FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let mut queues = Vec::new();
        for (i, c) in self.queues.iter().enumerate() {
            if !c.enabled {
                return Err(format!("queue {i} not enabled"));
            }
            queues.push(c.build(&self.ram, i)?);
        }
        let Some(mut dev) = self.dev.take() else {
            return Err("device lost after an earlier failure".into());
        };
        let stop = Arc::new(super::eventfd().map_err(|e| e.to_string())?);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut ep = super::EpollHelper::new(stop.clone(), stopping.clone())
            .map_err(|e| format!("event loop: {e}"))?;
        let mut act = Activation {
            ram: self.ram.clone(),
            queues,
            notify: self.notify.clone(),
            irq: self.irq.clone(),
            stop: stop.clone(),
            stopping: stopping.clone(),
            features: self.driver_features,
        };
        // If spawning fails the closure (and the device in it) is gone: the
        // function then stays broken until the next run rebuilds it.
        let handle = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                crate::threads::started(crate::threads::ThreadKind::Device);
                dev.run(&mut act, &mut ep);
                dev
            })
            .map_err(|e| format!("spawn: {e}"))?;
        self.worker = Some(Worker {
            handle,
            stop,
            stopping,
        });
        Ok(())
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stopping.store(true, Ordering::Release);
            let _ = w.stop.write(1);
            match w.handle.join() {
                Ok(dev) => self.dev = Some(dev),
                Err(_) => log::error!("{}: device thread panicked; device lost", self.name),
            }
        }
    }

    /// Device reset (status 0).
    fn reset(&mut self) {
        self.stop_worker();
        for e in &self.notify {
            drain(e);
        }
        self.irq.reset();
        for c in self.queues.iter_mut() {
            *c = QueueConfig::new(c.max_size);
        }
        self.dfsel = 0;
        self.gfsel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_sel = 0;
    }

    /// End of the run: stop the device thread.
    pub fn shutdown(&mut self) {
        self.stop_worker();
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

/// A virtio function's PCI configuration space: identity, interrupt pin
/// and line, the BAR, and the MSI-X and virtio vendor capabilities.
struct Header {
    f: PciFunction,
    /// MSI-X vectors: one per queue and one for configuration changes.
    vectors: u16,
    /// Offset of the MSI-X capability.
    msix_cap: usize,
}

impl Header {
    fn new(
        ty: u32,
        place: &Placement,
        nq: usize,
        config_len: usize,
    ) -> crate::error::Result<Header> {
        let (class, sub) = class_of(ty);
        let mut f = PciFunction::new(
            VIRTIO_VENDOR,
            // Virtio device ids are below 64; 0 (0x1040) is reserved.
            VIRTIO_PCI_DEVICE_BASE + u16::try_from(ty).unwrap_or(0),
            class,
            sub,
        );
        f.cfg[0x08] = 1; // revision 1: modern only
        f.cfg[0x2c..0x2e].copy_from_slice(&VIRTIO_VENDOR.to_le_bytes());
        f.cfg[0x2e..0x30].copy_from_slice(&0x1100u16.to_le_bytes());
        // 0xff: "unknown / not connected"; IOAPIC lines are below 24.
        f.cfg[0x3c] = u8::try_from(place.intx_line).unwrap_or(0xff);
        f.cfg[0x3d] = place.intx_pin + 1; // 1 = INTA#
        f.set_mem_bar(0, BAR_SIZE, place.bar_addr);
        f.cfg[4] |= 2; // memory space on
        let vectors = u16::try_from(nq + 1)
            .map_err(|_| crate::error::Error::Unsupported("too many virtqueues".into()))?;
        let mut msix = vec![0x11, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&const { cast::const_u32(MSIX_TABLE) }.to_le_bytes()); // BIR 0
        msix.extend_from_slice(&const { cast::const_u32(MSIX_PBA) }.to_le_bytes());
        let err = || crate::error::Error::Unsupported("PCI capability space full".into());
        let msix_cap = f.add_cap(&msix).ok_or_else(err)?;
        f.wmask[msix_cap + 3] = 0xc0; // MSI-X enable, function mask
        for c in [
            vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, None),
            vendor_cap(CAP_ISR, ISR, 1, None),
            vendor_cap(CAP_DEVICE, DEVCFG, config_len.max(4) as u64, None),
            vendor_cap(
                CAP_NOTIFY,
                NOTIFY,
                NOTIFY_MULT * nq as u64,
                Some(const { cast::const_u32(NOTIFY_MULT) }),
            ),
        ] {
            f.add_cap(&c).ok_or_else(err)?;
        }
        Ok(Header {
            f,
            vectors,
            msix_cap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Region;

    /// Random register traffic from a "driver" that knows nothing: the
    /// transport and the device thread must neither panic nor hang.
    #[test]
    fn random_register_traffic_is_survived() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let len = 1usize << 20;
        // SAFETY: an anonymous mapping for the fake guest RAM, unmapped below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let ram = Arc::new(
            Ram::new(&[Region {
                gpa: 0,
                len: len as u64,
                host: host as usize,
            }])
            .unwrap(),
        );
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let (f, mut v) = VirtioPci::build(
            Box::new(crate::devices::virtio::rng::Rng),
            "fuzz".into(),
            vm,
            router,
            ram,
            Placement {
                bar_addr: 0xc000_0000,
                intx_pin: 0,
                intx_line: 16,
                source: 0,
            },
        )
        .unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..4000 {
            let r = next();
            let size = [1usize, 2, 4, 8][(r & 3) as usize];
            let off = match (r >> 2) % 6 {
                0..=2 => (r >> 8) % 0x40,
                3 => NOTIFY + (r >> 8) % 16,
                4 => MSIX_TABLE + (r >> 8) % 0x60,
                _ => (r >> 8) % BAR_SIZE,
            };
            let off = off.min(BAR_SIZE - size as u64);
            let val = match (r >> 40) % 4 {
                // Plausible addresses in RAM, small numbers, status bits, junk.
                0 => (next() % (len as u64)) & !0xf,
                1 => next() % 512,
                2 => [0u64, 1, 3, 11, 15, 0x4f][(next() % 6) as usize],
                _ => next(),
            };
            let mut data = val.to_le_bytes();
            if r & (1 << 60) != 0 {
                v.bar_read(0, off, &mut data[..size]);
            } else {
                v.bar_write(0, off, &data[..size]);
            }
            if r & (1 << 61) != 0 && r & (1 << 62) != 0 {
                let mut cfg = f.cfg;
                cfg[v.msix_cap + 3] = cast::low_u8(next()) & 0xc0;
                v.config_written(&cfg, 0xc000_0000 + (next() % 4) * 0x4000, next() & 1 == 0);
            }
        }
        v.shutdown();
        drop(v);
        // SAFETY: the device thread is joined; nothing uses the mapping now.
        unsafe { libc::munmap(host, len) };
    }
}
