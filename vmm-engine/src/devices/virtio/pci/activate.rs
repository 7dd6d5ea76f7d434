//! A function's device thread: started at DRIVER_OK with the queues the
//! driver set up, stopped and joined at reset and at the end of the run.

use super::super::epoll::EpollHelper;
use super::super::queue::{QueueConfig, SetupError};
use super::super::{drain, Activation, S_FEATURES_OK};
use super::{VirtioPci, Worker};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why DRIVER_OK could not start the device (it then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("DRIVER_OK without FEATURES_OK")]
    NoFeaturesOk,
    #[error("queue {0} not enabled")]
    QueueNotEnabled(usize),
    #[error(transparent)]
    Queue(#[from] SetupError),
    #[error("device lost after an earlier failure")]
    DeviceLost,
    #[error("stop eventfd: {0}")]
    StopEventFd(#[source] crate::error::Error),
    #[error("event loop: {0}")]
    EventLoop(#[source] std::io::Error),
    #[error("spawn: {0}")]
    Spawn(#[source] std::io::Error),
}

impl VirtioPci {
    pub(super) fn activate(&mut self) -> Result<(), ActivateError> {
        if self.status & S_FEATURES_OK == 0 {
            return Err(ActivateError::NoFeaturesOk);
        }
        let mut queues = Vec::new();
        for (i, c) in self.queues.iter().enumerate() {
            if !c.enabled {
                return Err(ActivateError::QueueNotEnabled(i));
            }
            queues.push(c.build(&self.ram, i)?);
        }
        let Some(mut dev) = self.dev.take() else {
            return Err(ActivateError::DeviceLost);
        };
        let stop = Arc::new(super::super::eventfd().map_err(ActivateError::StopEventFd)?);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut ep =
            EpollHelper::new(stop.clone(), stopping.clone()).map_err(ActivateError::EventLoop)?;
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
            .map_err(ActivateError::Spawn)?;
        self.worker = Some(Worker {
            handle,
            stop,
            stopping,
        });
        Ok(())
    }

    pub(super) fn stop_worker(&mut self) {
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
    pub(super) fn reset(&mut self) {
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
}
