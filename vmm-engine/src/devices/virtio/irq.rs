//! Interrupt delivery for virtio-pci: MSI-X vectors (each an irqfd on its
//! own GSI, routed with KVM_SET_GSI_ROUTING to the address/data the guest
//! put in the table) and INTx (the ISR status plus a level on an IOAPIC pin).
//!
//! Masking and the pending-bit array live here, in user space: a device
//! thread asks for a vector and this decides whether it fires now or is
//! remembered until the guest unmasks it (as the PCI spec requires).

use crate::cast;
use kvm_bindings::{kvm_irq_routing_entry, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// "No vector" in the virtio common configuration.
pub const NO_VECTOR: u16 = 0xffff;
/// First GSI free for MSI routes (0..23 are the IOAPIC pins).
const FIRST_MSI_GSI: u32 = 24;
/// KVM's route table limit on x86 is 4096; stay far below.
const MAX_GSI: u32 = 1024;

#[derive(Default)]
struct RouterState {
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
    /// INTx lines: which sources currently assert each (shared lines OR).
    intx: HashMap<u32, u64>,
}

/// The VM's GSI routing table. Setting routes replaces KVM's whole table,
/// so the legacy IOAPIC/PIC entries ([`crate::devices::routing::legacy_routes`])
/// are always written along with the MSI ones (without them the legacy
/// IRQs of the serial ports and the PIT would stop).
pub struct GsiRouter {
    vm: Arc<VmFd>,
    st: Mutex<RouterState>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> GsiRouter {
        GsiRouter {
            vm,
            st: Mutex::new(RouterState {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        }
    }

    /// Reserve `n` consecutive GSIs; None when the table is full.
    pub fn alloc(&self, n: u32) -> Option<u32> {
        let mut st = self.st.lock();
        let base = st.next_gsi;
        if base + n > MAX_GSI {
            return None;
        }
        st.next_gsi += n;
        Some(base)
    }

    fn commit(&self, st: &RouterState) -> bool {
        let msi: Vec<kvm_irq_routing_entry> = st
            .msi
            .iter()
            .map(|(&gsi, &(addr, data))| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = cast::low_u32(addr);
                e.u.msi.address_hi = cast::high_u32(addr);
                e.u.msi.data = data;
                e
            })
            .collect();
        match crate::devices::routing::set_gsi_routing(&self.vm, &msi) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{e}");
                false
            }
        }
    }

    /// Point `gsi` at MSI address/data.
    pub fn set_msi(&self, gsi: u32, addr: u64, data: u32) -> bool {
        let mut st = self.st.lock();
        if st.msi.get(&gsi) == Some(&(addr, data)) {
            return true;
        }
        st.msi.insert(gsi, (addr, data));
        self.commit(&st)
    }

    /// Drive an INTx line for `source` (a bit index < 64); the pin is the OR
    /// of its sources.
    pub fn set_intx(&self, line: u32, source: u32, level: bool) {
        let mut st = self.st.lock();
        let bits = st.intx.entry(line).or_default();
        let before = *bits != 0;
        let bit = 1u64 << (source % 64);
        if level {
            *bits |= bit;
        } else {
            *bits &= !bit;
        }
        let after = *bits != 0;
        if before != after {
            if let Err(e) = self.vm.set_irq_line(line, after) {
                log::debug!("KVM_IRQ_LINE {line}={after}: {e}");
            }
        }
    }
}

/// Interrupt delivery as a device back end sees it: the only two things a
/// device thread signals. The PCI transport's [`Interrupt`] implements it
/// with MSI-X or INTx; unit tests substitute a recorder, so the request
/// paths run without KVM.
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `q` has used buffers.
    fn queue(&self, q: usize);
    /// The driver broke the protocol: DEVICE_NEEDS_RESET plus a
    /// configuration-change interrupt.
    fn needs_reset(&self);
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct MsixEntry {
    addr: u64,
    data: u32,
    ctrl: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.ctrl & 1 != 0
    }
}

struct IrqState {
    msix_enabled: bool,
    fn_masked: bool,
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    intx: bool,
    needs_reset: bool,
}

/// One device's interrupts.
pub struct Interrupt {
    vm: Arc<VmFd>,
    router: Arc<GsiRouter>,
    gsi_base: Option<u32>,
    irqfds: Vec<Option<EventFd>>,
    intx_line: u32,
    source: u32,
    st: Mutex<IrqState>,
}

impl Interrupt {
    /// `vectors` MSI-X table entries, `queues` queues, INTx on `intx_line`.
    pub fn new(
        vm: Arc<VmFd>,
        router: Arc<GsiRouter>,
        vectors: u16,
        queues: usize,
        intx_line: u32,
        source: u32,
    ) -> Interrupt {
        let gsi_base = router.alloc(u32::from(vectors));
        let mut irqfds = Vec::new();
        for i in 0..vectors {
            // Without irqfd (or GSIs) vectors are sent with KVM_SIGNAL_MSI.
            let fd = gsi_base.and_then(|b| {
                let e = super::host::eventfd().ok()?;
                match vm.register_irqfd(&e, b + u32::from(i)) {
                    Ok(()) => Some(e),
                    Err(err) => {
                        log::debug!("KVM_IRQFD: {err}; using KVM_SIGNAL_MSI");
                        None
                    }
                }
            });
            irqfds.push(fd);
        }
        Interrupt {
            vm,
            router,
            gsi_base,
            irqfds,
            intx_line,
            source,
            st: Mutex::new(IrqState {
                msix_enabled: false,
                fn_masked: false,
                table: vec![
                    MsixEntry {
                        ctrl: 1,
                        ..Default::default()
                    };
                    usize::from(vectors)
                ],
                pending: vec![false; usize::from(vectors)],
                isr: 0,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
                intx: false,
                needs_reset: false,
            }),
        }
    }

    pub fn vectors(&self) -> usize {
        self.irqfds.len()
    }

    fn fire(&self, st: &IrqState, v: usize) {
        if let Some(Some(fd)) = self.irqfds.get(v) {
            if fd.write(1).is_ok() {
                return;
            }
        }
        let e = st.table[v];
        let msi = kvm_bindings::kvm_msi {
            address_lo: cast::low_u32(e.addr),
            address_hi: cast::high_u32(e.addr),
            data: e.data,
            ..Default::default()
        };
        if let Err(err) = self.vm.signal_msi(msi) {
            log::debug!("KVM_SIGNAL_MSI: {err}");
        }
    }

    fn deliver(&self, st: &mut IrqState, vector: u16, isr_bit: u8) {
        st.isr |= isr_bit;
        if st.msix_enabled {
            let v = usize::from(vector);
            if vector == NO_VECTOR || v >= st.table.len() {
                return;
            }
            if st.fn_masked || st.table[v].masked() {
                st.pending[v] = true;
            } else {
                self.fire(st, v);
            }
        } else if !st.intx {
            st.intx = true;
            self.router.set_intx(self.intx_line, self.source, true);
        }
    }

    /// Queue `q` has used buffers.
    pub fn queue(&self, q: usize) {
        let mut st = self.st.lock();
        let v = st.queue_vectors.get(q).copied().unwrap_or(NO_VECTOR);
        self.deliver(&mut st, v, 1);
    }

    /// Configuration (or status) changed.
    pub fn config(&self) {
        let mut st = self.st.lock();
        let v = st.config_vector;
        self.deliver(&mut st, v, 2);
    }

    /// The device found the driver misbehaving: DEVICE_NEEDS_RESET plus a
    /// configuration-change interrupt.
    pub fn needs_reset(&self) {
        let mut st = self.st.lock();
        if st.needs_reset {
            return;
        }
        st.needs_reset = true;
        let v = st.config_vector;
        self.deliver(&mut st, v, 2);
    }

    pub fn broken(&self) -> bool {
        self.st.lock().needs_reset
    }

    /// ISR read: returns and clears it, dropping INTx.
    pub fn read_isr(&self) -> u8 {
        let mut st = self.st.lock();
        let v = st.isr;
        st.isr = 0;
        if st.intx {
            st.intx = false;
            self.router.set_intx(self.intx_line, self.source, false);
        }
        v
    }

    pub fn set_config_vector(&self, v: u16) {
        self.st.lock().config_vector = v;
    }

    pub fn config_vector(&self) -> u16 {
        self.st.lock().config_vector
    }

    pub fn set_queue_vector(&self, q: usize, v: u16) {
        if let Some(x) = self.st.lock().queue_vectors.get_mut(q) {
            *x = v;
        }
    }

    pub fn queue_vector(&self, q: usize) -> u16 {
        self.st
            .lock()
            .queue_vectors
            .get(q)
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    /// Device reset: status-side interrupt state back to power-on (the
    /// MSI-X table belongs to PCI and stays).
    pub fn reset(&self) {
        let mut st = self.st.lock();
        st.isr = 0;
        st.needs_reset = false;
        st.config_vector = NO_VECTOR;
        for v in st.queue_vectors.iter_mut() {
            *v = NO_VECTOR;
        }
        if st.intx {
            st.intx = false;
            self.router.set_intx(self.intx_line, self.source, false);
        }
    }

    /// MSI-X capability's Message Control changed.
    pub fn set_msix_control(&self, enabled: bool, fn_masked: bool) {
        let mut st = self.st.lock();
        st.msix_enabled = enabled;
        st.fn_masked = fn_masked;
        if enabled && st.intx {
            st.intx = false;
            self.router.set_intx(self.intx_line, self.source, false);
        }
        self.flush_pending(&mut st);
    }

    fn flush_pending(&self, st: &mut IrqState) {
        if !st.msix_enabled || st.fn_masked {
            return;
        }
        for v in 0..st.table.len() {
            if st.pending[v] && !st.table[v].masked() {
                st.pending[v] = false;
                self.fire(st, v);
            }
        }
    }

    /// Read from the MSI-X table (`off` within it).
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        let st = self.st.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let o = off + i as u64;
            let (v, field) = ((o / 16) as usize, o % 16);
            *b = match st.table.get(v) {
                Some(e) => {
                    let bytes = match field / 4 {
                        0 => cast::low_u32(e.addr).to_le_bytes(),
                        1 => cast::high_u32(e.addr).to_le_bytes(),
                        2 => e.data.to_le_bytes(),
                        _ => e.ctrl.to_le_bytes(),
                    };
                    bytes[(field % 4) as usize]
                }
                None => 0xff,
            };
        }
    }

    /// Write to the MSI-X table: dword or qword accesses within one entry.
    pub fn table_write(&self, off: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8)
            || !off.is_multiple_of(4)
            || off % 16 + data.len() as u64 > 16
        {
            log::debug!("MSI-X table: ignored {}-byte write at {off:#x}", data.len());
            return;
        }
        let mut st = self.st.lock();
        let v = (off / 16) as usize;
        let Some(mut e) = st.table.get(v).copied() else {
            return;
        };
        for (k, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let x = u32::from_le_bytes(b);
            match (off % 16) / 4 + k as u64 {
                0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(x),
                1 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(x) << 32),
                2 => e.data = x,
                _ => e.ctrl = x & 1,
            }
        }
        let old = st.table[v];
        st.table[v] = e;
        if (old.addr, old.data) != (e.addr, e.data) {
            // v indexes the table (at most 2^16 vectors), so it fits.
            if let (Some(base), Ok(v)) = (self.gsi_base, u32::try_from(v)) {
                self.router.set_msi(base + v, e.addr, e.data);
            }
        }
        if old.masked() && !e.masked() {
            self.flush_pending(&mut st);
        }
    }

    /// Read from the pending-bit array.
    pub fn pba_read(&self, off: u64, data: &mut [u8]) {
        let st = self.st.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let base = (cast::usize_from(off) + i) * 8;
            let mut x = 0u8;
            for bit in 0..8 {
                if st.pending.get(base + bit).copied().unwrap_or(false) {
                    x |= 1 << bit;
                }
            }
            *b = x;
        }
    }
}

impl VirtioInterrupt for Interrupt {
    fn queue(&self, q: usize) {
        Interrupt::queue(self, q)
    }

    fn needs_reset(&self) {
        Interrupt::needs_reset(self)
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if let Some(base) = self.gsi_base {
            for (i, fd) in self.irqfds.iter().enumerate() {
                if let (Some(fd), Ok(i)) = (fd, u32::try_from(i)) {
                    let _ = self.vm.unregister_irqfd(fd, base + i);
                }
            }
        }
        if self.st.lock().intx {
            self.router.set_intx(self.intx_line, self.source, false);
        }
    }
}
