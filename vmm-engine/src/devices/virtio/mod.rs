//! virtio 1.x devices on the modern PCI transport.
//!
//! Split of concerns:
//! - [`pci`]: the PCI function (capabilities, BAR 0 with common/ISR/device
//!   config, notify and MSI-X table/PBA), feature negotiation, queue set-up,
//!   activation and reset. Runs on vCPU threads (MMIO exits).
//! - [`irq`]: interrupt delivery (MSI-X through KVM irqfd + GSI routes,
//!   INTx through the IOAPIC) shared by the transport and the device thread.
//! - [`host`]: what device threads hold of the host: the guest-RAM view,
//!   eventfds, a readiness probe.
//! - [`epoll`]: the device threads' one event loop (stop handled there);
//!   [`service`]: the service rounds devices run on it.
//! - [`queue`]: split virtqueues (the rust-vmm `virtio-queue` crate) over the
//!   guest RAM, with the bounds checks device code relies on.
//! - [`blk`], [`net`], [`rng`], [`console`]: device back ends. Each runs on its own
//!   worker thread after DRIVER_OK, woken through its event loop by the
//!   queues' notify eventfds (KVM ioeventfds where the host offers them) and
//!   its back end's descriptors.
//!
//! Everything a guest writes (addresses, lengths, indexes, sizes) is checked;
//! a guest that breaks the rules gets DEVICE_NEEDS_RESET, never a host failure.
//! What the host spends on a guest is bounded per request, checked before
//! anything is copied or allocated (a chain's buffers may all alias one
//! page, so its length says nothing about what the guest paid for it):
//! each device names its limits, and one service round takes at most a
//! ring's worth of chains from a queue before the device thread looks at
//! its stop flag again (a driver refilling the ring as fast as the device
//! empties it must not keep reset or VM destruction waiting).

pub mod blk;
pub mod console;
pub mod epoll;
pub mod host;
pub mod irq;
pub mod net;
pub mod pci;
#[cfg(test)]
mod properties;
pub mod queue;
pub mod rng;
pub mod service;
#[cfg(test)]
pub mod test_utils;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub use epoll::EpollHelper;
pub use host::{drain, eventfd, probe, Ram};
pub use irq::{GsiRouter, Interrupt, VirtioInterrupt};
pub use queue::{Chain, QueueError, VirtQueue};
use virtio_bindings::{virtio_config as config, virtio_ids as ids};

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern (non-transitional) PCI device ids are 0x1040 + device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Device types (virtio 1.x section 5), from rust-vmm's virtio-bindings
/// (Linux's uapi headers).
pub const TYPE_NET: u32 = ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
pub const TYPE_CONSOLE: u32 = ids::VIRTIO_ID_CONSOLE;
pub const TYPE_RNG: u32 = ids::VIRTIO_ID_RNG;

/// Feature bits common to every device.
pub const F_VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;

/// Device status bits (one byte in the common configuration).
pub const S_ACKNOWLEDGE: u8 = status(config::VIRTIO_CONFIG_S_ACKNOWLEDGE);
pub const S_DRIVER: u8 = status(config::VIRTIO_CONFIG_S_DRIVER);
pub const S_DRIVER_OK: u8 = status(config::VIRTIO_CONFIG_S_DRIVER_OK);
pub const S_FEATURES_OK: u8 = status(config::VIRTIO_CONFIG_S_FEATURES_OK);
pub const S_NEEDS_RESET: u8 = status(config::VIRTIO_CONFIG_S_NEEDS_RESET);
pub const S_FAILED: u8 = status(config::VIRTIO_CONFIG_S_FAILED);

/// A status bit of the bindings (a u32) as the byte it lives in.
const fn status(bit: u32) -> u8 {
    crate::cast::const_u8(bit as u64)
}

/// What a device thread gets at DRIVER_OK.
pub struct Activation {
    pub ram: Arc<Ram>,
    pub queues: Vec<VirtQueue>,
    /// One per queue: signalled by the guest's notify writes.
    pub notify: Vec<Arc<EventFd>>,
    pub irq: Arc<dyn VirtioInterrupt>,
    /// Readable when the device must stop (reset or end of run).
    pub stop: Arc<EventFd>,
    /// Set when the thread should stop; checked around blocking calls.
    pub stopping: Arc<AtomicBool>,
    /// Negotiated features.
    pub features: u64,
}

impl Activation {
    /// The device thread's event loop, holding this activation's stop.
    pub fn event_loop(&self) -> std::io::Result<EpollHelper> {
        EpollHelper::new(self.stop.clone(), self.stopping.clone())
    }

    /// The guest broke the queue protocol: mark the device broken and stop
    /// using it until the driver resets it.
    pub fn broken(&self, why: &QueueError) {
        log::warn!("virtio device needs reset: {why}");
        self.irq.needs_reset();
    }

    /// Queue `q` may hold more than this round took: wake the device
    /// thread again once it has looked at its stop flag.
    pub fn again(&self, q: usize) {
        let _ = self.notify[q].write(1);
    }

    /// Serve queue `q` with `request` (which returns the bytes it wrote into
    /// the chain), for at most one ring's worth of chains; interrupt the
    /// driver if anything was used.
    pub fn serve_queue(
        &mut self,
        q: usize,
        mut request: impl FnMut(&Ram, &Chain) -> u32,
    ) -> std::result::Result<(), QueueError> {
        let ram = self.ram.clone();
        let vq = &mut self.queues[q];
        let mut budget = vq.size();
        let mut any = false;
        'ring: loop {
            vq.disable_notify(&ram);
            while let Some(c) = vq.pop(&ram)? {
                let n = request(&ram, &c);
                vq.push(&ram, c.head, n)?;
                any = true;
                budget -= 1;
                if budget == 0 {
                    let _ = self.notify[q].write(1);
                    break 'ring;
                }
            }
            if !vq.enable_notify(&ram)? {
                break;
            }
        }
        if any && vq.needs_notification(&ram) {
            self.irq.queue(q);
        }
        Ok(())
    }
}

/// A virtio device back end.
pub trait VirtioDevice: Send {
    /// Device type (TYPE_*).
    fn device_type(&self) -> u32;
    /// Offered features, VERSION_1 included.
    fn features(&self) -> u64;
    /// Queue count and the largest size of each.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device configuration space (read-only snapshot for the driver).
    fn config(&self) -> Vec<u8>;
    /// Run the device on `ep` (which holds the activation's stop) until it
    /// must stop. Called on the device thread.
    fn run(&mut self, act: &mut Activation, ep: &mut EpollHelper);
}
