//! How device threads are driven on the [event loop](super::epoll): a
//! service round whenever a queue is notified or a back end is ready, for
//! single-queue devices (blk, rng) and receive/transmit pairs (net,
//! console). A guest that breaks a queue makes the device broken until the
//! driver resets it; the loop then only waits for the stop.

use super::epoll::{EpollHandler, EpollHelper};
use super::{drain, Activation, QueueError};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::epoll::EventSet;

/// Tokens of back-end descriptors; queue notifies use their queue index.
const BACKEND: u64 = 16;

/// `events` if they are wanted, else none.
pub fn wanted(events: EventSet, want: bool) -> EventSet {
    if want {
        events
    } else {
        EventSet::empty()
    }
}

/// A device with a receive queue 0 and a transmit queue 1 (net, console).
pub trait RxTx {
    /// Take what the guest queued for sending (at most a ring's worth of
    /// chains); true if buffers were used.
    fn transmit(&mut self, act: &mut Activation) -> Result<bool, QueueError>;
    /// Push what is waiting to the back end, as far as it takes it now.
    fn flush(&mut self);
    /// Fill the guest's receive buffers (at most a ring's worth); true if
    /// buffers were used.
    fn receive(&mut self, act: &mut Activation) -> Result<bool, QueueError>;
    /// The back end's descriptors and what to wait for on each now (empty:
    /// nothing); one descriptor may be named twice. `broken`: no input is
    /// wanted for a broken device.
    fn backend_interest(&self, broken: bool) -> [(RawFd, EventSet); 2];
    /// The back end reported `events` (hang-ups and errors included).
    fn backend_event(&mut self, _events: EventSet) {}
}

/// One round of an [`RxTx`] device: clear the notifications, move what the
/// guest sent and what the back end has for it, and interrupt the guest for
/// each queue that used buffers. A guest that breaks a queue makes the device
/// broken (`*broken`) until the driver resets it.
pub fn service_rx_tx(dev: &mut impl RxTx, act: &mut Activation, broken: &mut bool) {
    drain(&act.notify[0]);
    drain(&act.notify[1]);
    if *broken {
        return;
    }
    let moved = dev.transmit(act).and_then(|tx| {
        dev.flush();
        Ok((tx, dev.receive(act)?))
    });
    match moved {
        Ok((tx, rx)) => {
            let ram = act.ram.clone();
            if tx && act.queues[1].needs_notification(&ram) {
                act.irq.queue(1);
            }
            if rx && act.queues[0].needs_notification(&ram) {
                act.irq.queue(0);
            }
        }
        Err(why) => {
            act.broken(&why);
            *broken = true;
        }
    }
}

/// A device's state on its thread: one service round at a time.
trait Rounds: EpollHandler {
    fn act(&mut self) -> &mut Activation;
    fn round(&mut self, ep: &mut EpollHelper);
}

/// Watch the queues' notify eventfds, serve once (buffers may have been
/// queued before DRIVER_OK), then run the loop until the device stops. An
/// event loop that fails leaves the device needing a reset.
fn drive(h: &mut impl Rounds, ep: &mut EpollHelper) {
    let notify: Vec<RawFd> = h.act().notify.iter().map(|e| e.as_raw_fd()).collect();
    let r = (0u64..)
        .zip(notify)
        .try_for_each(|(q, fd)| ep.add_event(fd, q))
        .and_then(|()| {
            h.round(ep);
            ep.run(h)
        });
    if let Err(e) = r {
        log::warn!("virtio device event loop: {e}");
        h.act().irq.needs_reset();
    }
}

/// A single-queue device: `serve` takes one round's worth of queue 0.
struct QueueLoop<'a, F> {
    act: &'a mut Activation,
    serve: F,
    broken: bool,
}

impl<F: FnMut(&mut Activation) -> Result<(), QueueError>> Rounds for QueueLoop<'_, F> {
    fn act(&mut self) -> &mut Activation {
        self.act
    }

    fn round(&mut self, _: &mut EpollHelper) {
        drain(&self.act.notify[0]);
        if self.broken {
            return;
        }
        if let Err(why) = (self.serve)(self.act) {
            self.act.broken(&why);
            self.broken = true;
        }
    }
}

impl<F: FnMut(&mut Activation) -> Result<(), QueueError>> EpollHandler for QueueLoop<'_, F> {
    fn handle_event(&mut self, ep: &mut EpollHelper, _: u64, _: EventSet) -> ControlFlow<()> {
        self.round(ep);
        ControlFlow::Continue(())
    }
}

/// Run a single-queue device until it must stop.
pub fn run_queue(
    act: &mut Activation,
    ep: &mut EpollHelper,
    serve: impl FnMut(&mut Activation) -> Result<(), QueueError>,
) {
    drive(
        &mut QueueLoop {
            act,
            serve,
            broken: false,
        },
        ep,
    );
}

/// A receive/transmit device and its back end.
struct RxTxLoop<'a, D> {
    dev: &'a mut D,
    act: &'a mut Activation,
    broken: bool,
}

impl<D: RxTx> Rounds for RxTxLoop<'_, D> {
    fn act(&mut self) -> &mut Activation {
        self.act
    }

    /// Serve, then wait on the back end for what it is wanted for now.
    fn round(&mut self, ep: &mut EpollHelper) {
        service_rx_tx(self.dev, self.act, &mut self.broken);
        let want = self.dev.backend_interest(self.broken);
        // One registration per descriptor: what both entries want of it.
        let merged = if want[0].0 == want[1].0 {
            [(want[0].0, want[0].1 | want[1].1), (-1, EventSet::empty())]
        } else {
            want
        };
        for (fd, events) in merged.into_iter().filter(|w| w.0 >= 0) {
            if let Err(e) = ep.watch(fd, BACKEND, events) {
                // A descriptor epoll cannot watch (a regular file,
                // /dev/null) is always ready, as poll(2) has it: go
                // round again once the loop has looked at the stop.
                log::trace!("virtio back end {fd}: {e}; taken as ready");
                self.act.again(0);
            }
        }
    }
}

impl<D: RxTx> EpollHandler for RxTxLoop<'_, D> {
    fn handle_event(
        &mut self,
        ep: &mut EpollHelper,
        token: u64,
        events: EventSet,
    ) -> ControlFlow<()> {
        if token == BACKEND {
            self.dev.backend_event(events);
        }
        self.round(ep);
        ControlFlow::Continue(())
    }
}

/// Run a receive/transmit device until it must stop.
pub fn run_rx_tx(dev: &mut impl RxTx, act: &mut Activation, ep: &mut EpollHelper) {
    drive(
        &mut RxTxLoop {
            dev,
            act,
            broken: false,
        },
        ep,
    );
}
