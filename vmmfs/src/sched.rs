//! Where work runs, so that no user can make another wait.
//!
//! FUSE threads only validate, enqueue and answer (DESIGN.md "Trust
//! boundary"). Work then goes to one of:
//! - [`FairPool`]: a few threads serving vmmctl work (creating and destroying
//!   KVM VMs) user by user in turn, so one user's burst gets its share and no
//!   more;
//! - [`Executor`]: one thread per VM for everything that touches the VM's
//!   client descriptors (configuration, detach, teardown). It may block on a
//!   user's hung file; only that VM's queue waits;
//! - [`Timer`]: deadlines (a create waiting for a destroy, a destroy's reply);
//! - [`Closer`]: closing descriptors a user sent, which can block (a close on a
//!   user's FUSE file system sends FLUSH and waits for its server), on a
//!   thread per user.

use parking_lot::{Condvar, Mutex};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

/// Stack size of the daemon's worker threads: jobs are shallow; the engine's
/// own vCPU and device threads are made by the engine.
const STACK: usize = 256 << 10;

/// The queue of one [`FairPool`] user was full.
#[derive(Debug)]
pub struct Busy;

struct PoolState {
    queues: HashMap<u32, VecDeque<Job>>,
    /// Users with a job running, on a worker or on a submitting thread.
    running: std::collections::HashSet<u32>,
    /// Users with queued work and nothing running, in serving order.
    turn: VecDeque<u32>,
    stop: bool,
}

impl PoolState {
    /// `user`'s job finished: its next one, if any, takes its turn.
    fn finished(&mut self, user: u32) -> bool {
        self.running.remove(&user);
        let more = self.queues.contains_key(&user);
        if more {
            self.turn.push_back(user);
        }
        more
    }
}

/// Threads serving per-user queues in turn, one job per user at a time: a
/// user's burst of requests (16 processes hammering vmmctl) runs one after
/// the other, and every other user's request is next in line. The work is
/// CPU-bound kernel work (creating and tearing down KVM VMs), so one job at
/// a time per user costs a single user little and keeps the CPU for others.
pub struct FairPool {
    state: Mutex<PoolState>,
    work: Condvar,
    max_queued: usize,
}

impl FairPool {
    /// Start `threads` workers; each user may have `max_queued` jobs waiting.
    pub fn start(threads: usize, max_queued: usize) -> Arc<FairPool> {
        let pool = Arc::new(FairPool {
            state: Mutex::new(PoolState {
                queues: HashMap::new(),
                running: std::collections::HashSet::new(),
                turn: VecDeque::new(),
                stop: false,
            }),
            work: Condvar::new(),
            max_queued,
        });
        for i in 0..threads.max(1) {
            let p = pool.clone();
            std::thread::Builder::new()
                .name(format!("fair-{i}"))
                .stack_size(STACK)
                .spawn(move || p.serve())
                .expect("spawning a worker thread");
        }
        pool
    }

    /// Queue `job` for `user`.
    pub fn submit(&self, user: u32, job: Job) -> Result<(), Busy> {
        self.enqueue(user, job, false)
    }

    /// Run `job` here if `user` has nothing else running or waiting, else
    /// queue it. A lone request costs no thread switch; a burst queues.
    pub fn run_or_submit(&self, user: u32, job: Job) -> Result<(), Busy> {
        {
            let mut s = self.state.lock();
            if s.queues.contains_key(&user) || !s.running.insert(user) {
                drop(s);
                return self.enqueue(user, job, false);
            }
        }
        struct Done<'a>(&'a FairPool, u32);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if self.0.state.lock().finished(self.1) {
                    self.0.work.notify_one();
                }
            }
        }
        let _done = Done(self, user);
        job();
        Ok(())
    }

    /// Queue `job` for `user` even over the user's bound: for work that must
    /// not be lost (a VM's teardown; there is at most one per VM).
    pub fn submit_always(&self, user: u32, job: Job) {
        let _ = self.enqueue(user, job, true);
    }

    fn enqueue(&self, user: u32, job: Job, always: bool) -> Result<(), Busy> {
        let mut s = self.state.lock();
        let q = s.queues.entry(user).or_default();
        if !always && q.len() >= self.max_queued {
            return Err(Busy);
        }
        q.push_back(job);
        let first = q.len() == 1;
        if first && !s.running.contains(&user) {
            s.turn.push_back(user);
        }
        drop(s);
        self.work.notify_one();
        Ok(())
    }

    fn serve(&self) {
        loop {
            let (user, job) = {
                let mut s = self.state.lock();
                loop {
                    if s.stop {
                        return;
                    }
                    if let Some(user) = s.turn.pop_front() {
                        let q = s.queues.get_mut(&user).expect("users in turn have queues");
                        let job = q.pop_front().expect("users in turn have work");
                        if q.is_empty() {
                            s.queues.remove(&user);
                        }
                        s.running.insert(user);
                        break (user, job);
                    }
                    self.work.wait(&mut s);
                }
            };
            job();
            // Back of the line: every other waiting user goes first.
            if self.state.lock().finished(user) {
                self.work.notify_one();
            }
        }
    }

    /// Stop the workers after the job each is running.
    #[cfg(test)]
    pub fn stop(&self) {
        self.state.lock().stop = true;
        self.work.notify_all();
    }
}

struct ExecState {
    queue: VecDeque<Job>,
    running: bool,
    /// A job was ever queued: the VM may hold client descriptors.
    used: bool,
    closed: bool,
}

/// Why an [`Executor`] refused a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many jobs waiting.
    Busy,
    /// The VM's last job (its teardown) was queued.
    Closed,
}

/// One VM's serial queue and the thread that drains it. The thread exists
/// only while there is work (and [`LINGER`] after), so idle VMs cost none.
pub struct Executor {
    name: String,
    state: Arc<(Mutex<ExecState>, Condvar)>,
    max_queued: usize,
}

impl Executor {
    pub fn new(name: &str, max_queued: usize) -> Executor {
        Executor {
            name: name.into(),
            state: Arc::new((
                Mutex::new(ExecState {
                    queue: VecDeque::new(),
                    running: false,
                    used: false,
                    closed: false,
                }),
                Condvar::new(),
            )),
            max_queued,
        }
    }

    /// Queue `job`; a thread is started if none is draining the queue.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let s = self.state.0.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        if s.queue.len() >= self.max_queued {
            return Err(Refused::Busy);
        }
        self.push(s, job);
        Ok(())
    }

    /// Queue the VM's last job. An executor that never ran anything is
    /// closed and the job handed back: the VM holds no client descriptor, so
    /// the caller may run it without a thread of its own.
    pub fn submit_last(&self, job: Job) -> Option<Job> {
        let mut s = self.state.0.lock();
        if s.closed {
            log::error!("VM {}: a second last job; ignored", self.name);
            return None;
        }
        s.closed = true;
        if !s.used {
            return Some(job);
        }
        self.push(s, job);
        None
    }

    fn push(&self, mut s: parking_lot::MutexGuard<'_, ExecState>, job: Job) {
        s.queue.push_back(job);
        s.used = true;
        if s.running {
            // The thread may be waiting out its LINGER.
            drop(s);
            self.state.1.notify_all();
            return;
        }
        s.running = true;
        drop(s);
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vm-{}", truncate(&self.name, 11)))
            .stack_size(STACK)
            .spawn(move || drain(&state));
        if spawned.is_err() {
            // No thread: run here rather than lose the work (a teardown must
            // happen). Only when the system is out of threads.
            log::error!("cannot start an executor thread for VM {}", self.name);
            drain(&self.state);
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// How long an [`Executor`]'s thread waits for the VM's next job once its
/// queue is empty. A client configures a VM one command per reply (a bhyve
/// launch sends nine within a few milliseconds); a thread started for each
/// cost the start and, on a busy machine, a wait for its first time slice.
const LINGER: Duration = Duration::from_millis(50);

fn drain(state: &(Mutex<ExecState>, Condvar)) {
    let mut s = state.0.lock();
    loop {
        if let Some(job) = s.queue.pop_front() {
            drop(s);
            job();
            s = state.0.lock();
            continue;
        }
        // A closed queue gets no more work; an open one may, shortly.
        if !s.closed && !state.1.wait_for(&mut s, LINGER).timed_out() {
            continue;
        }
        if s.queue.is_empty() {
            s.running = false;
            state.1.notify_all();
            return;
        }
    }
}

struct TimerState {
    heap: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    jobs: HashMap<u64, Job>,
    next: u64,
}

/// One thread running jobs at deadlines.
pub struct Timer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

impl Timer {
    pub fn start() -> Arc<Timer> {
        let t = Arc::new(Timer {
            state: Mutex::new(TimerState {
                heap: BinaryHeap::new(),
                jobs: HashMap::new(),
                next: 0,
            }),
            wake: Condvar::new(),
        });
        let t2 = t.clone();
        std::thread::Builder::new()
            .name("timer".into())
            .stack_size(STACK)
            .spawn(move || t2.serve())
            .expect("spawning the timer thread");
        t
    }

    /// Run `job` after `delay` (jobs must be quick: they run on the timer thread).
    pub fn after(&self, delay: Duration, job: Job) {
        let mut s = self.state.lock();
        let id = s.next;
        s.next += 1;
        s.jobs.insert(id, job);
        s.heap.push(std::cmp::Reverse((Instant::now() + delay, id)));
        drop(s);
        self.wake.notify_one();
    }

    fn serve(&self) {
        loop {
            let job = {
                let mut s = self.state.lock();
                loop {
                    let now = Instant::now();
                    match s.heap.peek() {
                        Some(std::cmp::Reverse((at, id))) if *at <= now => {
                            let id = *id;
                            s.heap.pop();
                            break s.jobs.remove(&id);
                        }
                        Some(std::cmp::Reverse((at, _))) => {
                            let at = *at;
                            self.wake.wait_until(&mut s, at);
                        }
                        None => self.wake.wait(&mut s),
                    }
                }
            };
            if let Some(job) = job {
                job();
            }
        }
    }
}

/// Descriptors a user handed over and that must now be closed.
pub struct Closer {
    users: Mutex<HashMap<u32, Arc<Mutex<VecDeque<std::os::fd::OwnedFd>>>>>,
}

/// Most descriptors of one user waiting to be closed: beyond it the user's
/// closes are stuck (a hung file system of theirs) and the daemon accepts no
/// more of their descriptors (see [`Closer::backlog`]).
pub const MAX_CLOSE_BACKLOG: usize = 1024;

impl Closer {
    pub fn new() -> Arc<Closer> {
        Arc::new(Closer {
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Close `fds` of `user` on that user's closing thread.
    pub fn close(self: &Arc<Self>, user: u32, fds: Vec<std::os::fd::OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        let mut users = self.users.lock();
        if let Some(q) = users.get(&user) {
            q.lock().extend(fds);
            return;
        }
        let q = Arc::new(Mutex::new(VecDeque::from(fds)));
        users.insert(user, q.clone());
        drop(users);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("close-{user}"))
            .stack_size(STACK)
            .spawn(move || me.drain(user, &q));
        if spawned.is_err() {
            log::error!("cannot start a thread to close descriptors of uid {user}");
        }
    }

    fn drain(&self, user: u32, q: &Mutex<VecDeque<std::os::fd::OwnedFd>>) {
        loop {
            let next = q.lock().pop_front();
            match next {
                Some(fd) => drop(fd),
                None => {
                    // Leave only if nothing arrived meanwhile (under the map's lock).
                    let mut users = self.users.lock();
                    if q.lock().is_empty() {
                        users.remove(&user);
                        return;
                    }
                }
            }
        }
    }

    /// Descriptors of `user` still waiting to be closed.
    pub fn backlog(&self, user: u32) -> usize {
        self.users.lock().get(&user).map_or(0, |q| q.lock().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn users_are_served_in_turn() {
        let pool = FairPool::start(1, 1000);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        // Hold the only worker so the queues fill up.
        pool.submit(0, Box::new(move || gate_rx.recv().unwrap()))
            .unwrap();
        for i in 0..20 {
            let tx = tx.clone();
            pool.submit(1, Box::new(move || tx.send((1, i)).unwrap()))
                .unwrap();
        }
        for i in 0..2 {
            let tx = tx.clone();
            pool.submit(2, Box::new(move || tx.send((2, i)).unwrap()))
                .unwrap();
        }
        gate_tx.send(()).unwrap();
        let order: Vec<(u32, i32)> = (0..22).map(|_| rx.recv().unwrap()).collect();
        // User 2's two jobs are among the first four, not after user 1's twenty.
        let pos: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, (u, _))| *u == 2)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(pos, vec![1, 3], "{order:?}");
        pool.stop();
    }

    #[test]
    fn a_lone_request_runs_inline_and_a_burst_queues() {
        let pool = FairPool::start(1, 1000);
        let here = std::thread::current().id();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pool.run_or_submit(
            7,
            Box::new(move || t.send(std::thread::current().id()).unwrap()),
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap(), here, "ran on the caller's thread");
        // While user 7 runs a job here, its next one goes to the pool.
        let p2 = pool.clone();
        let t = tx.clone();
        pool.run_or_submit(
            7,
            Box::new(move || {
                let t2 = t.clone();
                p2.run_or_submit(
                    7,
                    Box::new(move || t2.send(std::thread::current().id()).unwrap()),
                )
                .unwrap();
            }),
        )
        .unwrap();
        assert_ne!(rx.recv().unwrap(), here, "queued behind the running one");
        pool.stop();
    }

    #[test]
    fn a_full_queue_is_refused() {
        let pool = FairPool::start(1, 2);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        pool.submit(5, Box::new(move || gate_rx.recv().unwrap()))
            .unwrap();
        // The worker may not have taken the first job yet: fill until refused.
        let mut accepted = 0;
        while pool.submit(5, Box::new(|| {})).is_ok() {
            accepted += 1;
            assert!(accepted <= 3);
        }
        assert!(
            pool.submit(6, Box::new(|| {})).is_ok(),
            "other users unaffected"
        );
        gate_tx.send(()).unwrap();
        pool.stop();
    }

    #[test]
    fn executor_is_serial_and_a_stuck_one_stays_alone() {
        let a = Executor::new("a", 8);
        let b = Executor::new("b", 8);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        a.submit(Box::new(move || gate_rx.recv().unwrap())).unwrap();
        let t = tx.clone();
        a.submit(Box::new(move || t.send("a").unwrap())).unwrap();
        b.submit(Box::new(move || tx.send("b").unwrap())).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "b");
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        gate_tx.send(()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "a");
        assert!(a.submit_last(Box::new(|| {})).is_none(), "queued behind");
        assert_eq!(a.submit(Box::new(|| {})), Err(Refused::Closed));
        let unused = Executor::new("c", 8);
        assert!(unused.submit_last(Box::new(|| {})).is_some(), "handed back");
        assert_eq!(unused.submit(Box::new(|| {})), Err(Refused::Closed));
    }

    #[test]
    fn timer_runs_in_deadline_order() {
        let t = Timer::start();
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        for (ms, tag) in [(60u64, "late"), (20, "early")] {
            let tx = tx.clone();
            t.after(
                Duration::from_millis(ms),
                Box::new(move || tx.send(tag).unwrap()),
            );
        }
        assert_eq!(rx.recv().unwrap(), "early");
        assert_eq!(rx.recv().unwrap(), "late");
        assert!(t0.elapsed() >= Duration::from_millis(60));
    }
}
