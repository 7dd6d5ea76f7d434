//! The device threads' one event loop: an epoll set holding the
//! activation's stop eventfd and whatever a device registers (queue notify
//! eventfds, back-end descriptors), and the loop that waits on it. How a
//! device stops is decided here, for every device: the `stopping` flag
//! before each wait, the stop eventfd before any other event of a wake-up.
//! (After Cloud Hypervisor's `virtio-devices` EpollHelper.)

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The stop eventfd's token; devices use any other.
pub const STOP: u64 = u64::MAX;
/// Events taken from one wait at most (devices register a handful).
const EVENTS: usize = 8;

/// A device's reaction to what woke it.
pub trait EpollHandler {
    /// `events` happened on the descriptor registered with `token`. Break
    /// ends the loop (the device thread then returns).
    fn handle_event(
        &mut self,
        helper: &mut EpollHelper,
        token: u64,
        events: EventSet,
    ) -> ControlFlow<()>;
}

/// An epoll set with the activation's stop eventfd in it.
pub struct EpollHelper {
    epoll: Epoll,
    stopping: Arc<AtomicBool>,
    /// Kept open while it is in the set.
    _stop: Arc<EventFd>,
    /// Registered descriptors, their token and events: epoll holds one
    /// registration per descriptor, so [`EpollHelper::watch`] changes it.
    watched: Vec<(RawFd, u64, EventSet)>,
}

impl EpollHelper {
    /// A new set watching `stop`; the loop also ends once `stopping` is set.
    pub fn new(stop: Arc<EventFd>, stopping: Arc<AtomicBool>) -> io::Result<EpollHelper> {
        let mut h = EpollHelper {
            epoll: Epoll::new()?,
            stopping,
            _stop: stop.clone(),
            watched: Vec::new(),
        };
        h.add_event(stop.as_raw_fd(), STOP)?;
        Ok(h)
    }

    /// Wake for `fd` becoming readable, reported with `token`.
    pub fn add_event(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_event_custom(fd, token, EventSet::IN)
    }

    /// Wake for `events` on `fd`, reported with `token`.
    pub fn add_event_custom(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.watched.push((fd, token, events));
        Ok(())
    }

    /// Stop watching `fd`.
    pub fn del_event(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        self.watched.retain(|w| w.0 != fd);
        Ok(())
    }

    /// Watch `fd` for exactly `events` from now on; empty: not at all
    /// (epoll reports hang-ups and errors of every registered descriptor,
    /// wanted or not, so one with nothing to wait for is taken out).
    /// Descriptors epoll cannot watch (regular files, /dev/null) fail with
    /// EPERM: poll(2) calls them always ready.
    pub fn watch(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        let at = self.watched.iter().position(|w| w.0 == fd);
        match at {
            None if events.is_empty() => Ok(()),
            None => self.add_event_custom(fd, token, events),
            Some(_) if events.is_empty() => self.del_event(fd),
            Some(i) if self.watched[i].1 == token && self.watched[i].2 == events => Ok(()),
            Some(i) => {
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))?;
                self.watched[i] = (fd, token, events);
                Ok(())
            }
        }
    }

    /// Wait and dispatch until the device must stop or `handler` breaks.
    /// EINTR only waits again; any other failure of epoll_wait ends the
    /// loop with it.
    pub fn run(&mut self, handler: &mut impl EpollHandler) -> io::Result<()> {
        let mut events = [EpollEvent::default(); EVENTS];
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n.min(EVENTS),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let ready = &events[..n];
            if ready.iter().any(|e| e.data() == STOP) {
                return Ok(());
            }
            for e in ready {
                // A round may take a while: the flag is looked at between
                // them, not only before the next wait.
                if self.stopping.load(Ordering::Acquire)
                    || handler
                        .handle_event(self, e.data(), e.event_set())
                        .is_break()
                {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::host::eventfd;

    struct Count {
        seen: Vec<u64>,
        fd: Arc<EventFd>,
    }

    impl Count {
        fn new(fd: Arc<EventFd>) -> Count {
            Count {
                seen: Vec::new(),
                fd,
            }
        }
    }

    impl EpollHandler for Count {
        fn handle_event(
            &mut self,
            _: &mut EpollHelper,
            token: u64,
            _: EventSet,
        ) -> ControlFlow<()> {
            crate::devices::virtio::host::drain(&self.fd);
            self.seen.push(token);
            if self.seen.len() == 2 {
                ControlFlow::Break(())
            } else {
                let _ = self.fd.write(1);
                ControlFlow::Continue(())
            }
        }
    }

    /// A helper watching a signalled eventfd (token 7), with its stop
    /// eventfd and flag.
    fn helper() -> (EpollHelper, Arc<EventFd>, Arc<AtomicBool>, Arc<EventFd>) {
        let stop = Arc::new(eventfd().unwrap());
        let stopping = Arc::new(AtomicBool::new(false));
        let mut h = EpollHelper::new(stop.clone(), stopping.clone()).unwrap();
        let fd = Arc::new(eventfd().unwrap());
        h.add_event(fd.as_raw_fd(), 7).unwrap();
        fd.write(1).unwrap();
        (h, stop, stopping, fd)
    }

    #[test]
    fn events_reach_the_handler_until_it_breaks() {
        let (mut h, _stop, _, fd) = helper();
        let mut c = Count::new(fd);
        h.run(&mut c).unwrap();
        assert_eq!(c.seen, [7, 7]);
    }

    /// Stop wins over events of the same wake-up, and the flag over both.
    #[test]
    fn stop_is_seen_before_anything_else() {
        let (mut h, stop, _, fd) = helper();
        stop.write(1).unwrap();
        let mut c = Count::new(fd);
        h.run(&mut c).unwrap();
        assert!(c.seen.is_empty());
        // The flag alone ends the loop before it waits.
        let (mut h, _stop, stopping, _fd) = helper();
        stopping.store(true, Ordering::Release);
        h.run(&mut c).unwrap();
        assert!(c.seen.is_empty());
    }

    /// watch() adds, changes and removes one registration per descriptor.
    #[test]
    fn watch_follows_the_wanted_events() {
        let (mut h, _stop, _, _fd) = helper();
        let fd = eventfd().unwrap();
        let raw = fd.as_raw_fd();
        h.watch(raw, 3, EventSet::empty()).unwrap();
        assert_eq!(h.watched.len(), 2);
        h.watch(raw, 3, EventSet::IN).unwrap();
        h.watch(raw, 3, EventSet::IN | EventSet::OUT).unwrap();
        assert_eq!(h.watched.len(), 3);
        assert_eq!(h.watched[2].2, EventSet::IN | EventSet::OUT);
        h.watch(raw, 3, EventSet::empty()).unwrap();
        assert_eq!(h.watched.len(), 2);
    }
}
