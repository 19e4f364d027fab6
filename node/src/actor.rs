//! The engine actor: one thread owns the [`Engine`] (and through it the store) and runs
//! every operation on it, one after another, from one bounded queue.
//!
//! Everything else holds an [`EngineClient`]: the local API and embedding programs await
//! an operation's value ([`EngineClient::call`], the foreground queue); the network loop
//! hands over a job whose results come back to it as messages and never waits
//! ([`EngineClient::try_submit`], the background queue). The foreground always goes
//! first, so a person's request never waits behind a crowd of peers' work.
//!
//! Operations are run in groups: the actor runs the jobs waiting (up to [`MAX_GROUP`];
//! background jobs only while the group is younger than [`GROUP_TIME`]), all their writes
//! in one transaction of the store, then make them durable with one commit (group commit,
//! [`Engine::begin_group`]). Only then does any of them answer, so a value, an answer to a
//! peer or an event is never seen before what it reports is on disk. If a write or the
//! commit fails, every operation of the group gets the error and the engine reloads its
//! documents from the store.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::{Engine, EngineError};
use crate::views::Event;

/// Operations waiting for the engine, at most. Callers of [`EngineClient::call`] wait for
/// room; the network loop keeps what does not fit and tries again.
pub(crate) const ENGINE_QUEUE: usize = 1024;
/// The most operations made durable by one sync.
pub(crate) const MAX_GROUP: usize = 256;
/// How long a group keeps taking background jobs: once it has run this long, only callers
/// waiting in the foreground join it, and it ends when they are done.
pub(crate) const GROUP_TIME: std::time::Duration = std::time::Duration::from_millis(10);

/// How long the engine waits idle before it stores the heads peers reported
/// ([`Engine::store_hints`]): a sync in progress keeps it busy, so they are stored once,
/// after it.
pub(crate) const HINTS_IDLE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long heads peers reported wait at most on an engine that is never idle that long:
/// then they are stored after the group that finds them this old.
pub(crate) const HINTS_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// What an operation does once its group is durable (`Ok`) or failed (`Err`).
pub(crate) type Done = Box<dyn FnOnce(Result<(), &EngineError>) + Send>;
/// An operation: runs on the engine and returns what to do once it is durable. It gets an
/// error instead of the engine when the engine cannot run anything now (its memory could
/// not be made to match the store after a failed sync, as while a disk is full).
pub(crate) type Job = Box<dyn FnOnce(Result<&mut Engine, &EngineError>) -> Done + Send>;

/// What the actor's queue carries.
pub(crate) enum Msg {
    Job(Job),
    Stop(oneshot::Sender<()>),
}

/// A handle on the engine actor. Cheap to clone.
#[derive(Clone)]
pub struct EngineClient {
    /// The foreground queue: callers awaiting a value ([`EngineClient::call`]), and stop.
    tx: mpsc::Sender<Msg>,
    /// The background queue: the network loop's jobs ([`EngineClient::try_submit`]).
    bg: mpsc::Sender<Msg>,
    events: broadcast::Sender<Event>,
    stats: Arc<Counters>,
}

/// What the actor has done, counted as it goes.
#[derive(Debug, Default)]
struct Counters {
    jobs: AtomicU64,
    groups: AtomicU64,
    max_job_us: AtomicU64,
    max_group_us: AtomicU64,
}

/// What the engine actor has done since it started: how long the engine was held at most
/// by one job (a periodic task, an API call, a peer's request) and by one group (its jobs
/// and their one sync), during which every other caller waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Jobs run.
    pub jobs: u64,
    /// Groups run (each one sync of the store, if it wrote).
    pub groups: u64,
    /// The longest one job ran, in microseconds.
    pub max_job_us: u64,
    /// The longest one group ran, its sync included, in microseconds.
    pub max_group_us: u64,
}

impl std::fmt::Debug for EngineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineClient").finish_non_exhaustive()
    }
}

/// The two queues the actor serves: the foreground (callers awaiting a value, as the local
/// API) always first, then the background (the network loop's jobs).
struct Queues {
    fg: mpsc::Receiver<Msg>,
    bg: mpsc::Receiver<Msg>,
}

impl Queues {
    /// The next message without waiting: the foreground's, or when `bg` the background's.
    fn try_next(&mut self, bg: bool) -> Option<Msg> {
        match self.fg.try_recv() {
            Ok(m) => Some(m),
            Err(_) if bg => self.bg.try_recv().ok(),
            Err(_) => None,
        }
    }

    /// Waits for the next message, the foreground's first; `None` once every client is gone.
    fn next(&mut self) -> Option<Msg> {
        futures::executor::block_on(std::future::poll_fn(|cx| self.poll_next(cx)))
    }

    /// Like [`Queues::next`], for at most `wait`: `Err(())` if nothing came.
    fn next_within(&mut self, wait: std::time::Duration) -> Result<Option<Msg>, ()> {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let deadline = Instant::now() + wait;
        loop {
            if let std::task::Poll::Ready(m) = self.poll_next(&mut cx) {
                return Ok(m);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(());
            }
            // Woken early by a message (or spuriously): polled again either way.
            std::thread::park_timeout(deadline - now);
        }
    }

    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Msg>> {
        use std::task::Poll;
        match self.fg.poll_recv(cx) {
            Poll::Ready(Some(m)) => return Poll::Ready(Some(m)),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        self.bg.poll_recv(cx)
    }
}

/// Stores the heads the engine recorded, in a group of their own (see
/// [`Engine::store_hints`]). The group always ends, so a failure (a full disk) fails no
/// later operation; it is logged, and the heads are gone (hints, which cost a round).
fn store_hints(engine: &mut Engine) {
    if engine.refresh().is_err() {
        return;
    }
    engine.begin_group();
    let stored = engine.store_hints();
    let ended = engine.end_group();
    if let Err(e) = stored.and(ended) {
        tracing::warn!("storing the heads peers reported: {e}");
    }
}

fn run(mut engine: Engine, mut queues: Queues, stats: Arc<Counters>) {
    let micros = |since: Instant| u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut stop = None;
    while stop.is_none() {
        let first = if engine.has_hints() {
            match queues.next_within(HINTS_IDLE) {
                Ok(m) => m,
                Err(()) => {
                    store_hints(&mut engine);
                    continue;
                }
            }
        } else {
            queues.next()
        };
        let Some(first) = first else {
            break;
        };
        // A panic here (outside `rapport_protocol::contain`) may leave memory that does not
        // match the store: stop the process loudly; everything acknowledged is on disk.
        let group_started = Instant::now();
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let ready = engine.refresh();
            if ready.is_ok() {
                engine.begin_group();
            }
            let mut done: Vec<Done> = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                let job = match msg {
                    Msg::Job(job) => job,
                    Msg::Stop(reply) => {
                        stop = Some(reply);
                        // What the network queued before the stop still runs.
                        next = queues.bg.try_recv().ok();
                        continue;
                    }
                };
                let started = Instant::now();
                done.push(match &ready {
                    Ok(()) => job(Ok(&mut engine)),
                    Err(e) => job(Err(e)),
                });
                stats.jobs.fetch_add(1, Ordering::Relaxed);
                stats
                    .max_job_us
                    .fetch_max(micros(started), Ordering::Relaxed);
                // Once stopping, the group takes everything the network queued before the
                // stop (at most the queue's capacity), not one group's worth: the loop
                // ends with this group.
                if done.len() < MAX_GROUP || stop.is_some() {
                    next = if stop.is_some() {
                        queues.bg.try_recv().ok()
                    } else {
                        // Background work joins the group while it is young: a caller
                        // waiting in the foreground is answered within about GROUP_TIME.
                        queues.try_next(group_started.elapsed() < GROUP_TIME)
                    };
                }
            }
            let synced = match ready {
                Ok(()) => engine.end_group(),
                Err(e) => Err(e),
            };
            (done, synced)
        }));
        let Ok((done, synced)) = ran else {
            tracing::error!("the engine failed (a panic); stopping the node");
            std::process::abort();
        };
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats
            .max_group_us
            .fetch_max(micros(group_started), Ordering::Relaxed);
        for d in done {
            d(synced.as_ref().map(|_| ()));
        }
        if engine.hints_older_than(HINTS_AGE) {
            store_hints(&mut engine);
        }
    }
    // Jobs still queued are dropped: their callers hear that the engine stopped.
    drop(queues);
    // Dropping the engine stores the heads it recorded (a failure to fails no operation).
    drop(engine);
    if let Some(reply) = stop {
        let _ = reply.send(());
    }
}

impl EngineClient {
    /// Starts the actor thread, which owns `engine` from now on (a running [`crate::Node`]
    /// starts its own; this is for programs that use an engine without the network).
    pub fn start(engine: Engine) -> std::io::Result<EngineClient> {
        let (tx, fg) = mpsc::channel(ENGINE_QUEUE);
        let (bg_tx, bg) = mpsc::channel(ENGINE_QUEUE);
        let events = engine.event_sender();
        let stats = Arc::new(Counters::default());
        let counters = stats.clone();
        std::thread::Builder::new()
            .name("rapport-engine".into())
            .spawn(move || run(engine, Queues { fg, bg }, counters))?;
        Ok(EngineClient {
            tx,
            bg: bg_tx,
            events,
            stats,
        })
    }

    /// What the actor has done so far.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            jobs: self.stats.jobs.load(Ordering::Relaxed),
            groups: self.stats.groups.load(Ordering::Relaxed),
            max_job_us: self.stats.max_job_us.load(Ordering::Relaxed),
            max_group_us: self.stats.max_group_us.load(Ordering::Relaxed),
        }
    }

    /// Operations waiting in the queues now (foreground and background).
    pub fn queued(&self) -> usize {
        (self.tx.max_capacity() - self.tx.capacity())
            + (self.bg.max_capacity() - self.bg.capacity())
    }

    /// Runs `f` on the engine and returns its value once everything it wrote is durable.
    pub async fn call<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        F: FnOnce(&mut Engine) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |engine| {
            let value = engine.map(f).map_err(EngineError::duplicate);
            Box::new(move |synced| {
                let _ = reply.send(match synced {
                    Ok(()) => value,
                    Err(err) => Err(err.duplicate()),
                });
            })
        });
        self.tx
            .send(Msg::Job(job))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// [`EngineClient::call`] for an operation that can fail itself.
    pub async fn try_call<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        F: FnOnce(&mut Engine) -> Result<T, EngineError> + Send + 'static,
        T: Send + 'static,
    {
        self.call(f).await?
    }

    /// Queues `job` in the background queue if there is room; hands it back if the queue
    /// is full. Never waits.
    pub(crate) fn try_submit(&self, job: Job) -> Result<(), TrySubmit> {
        match self.bg.try_send(Msg::Job(job)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Msg::Job(job))) => Err(TrySubmit::Full(job)),
            Err(_) => Err(TrySubmit::Stopped),
        }
    }

    /// Room in the background queue for one job, when there is some (for a loop that must
    /// not wait).
    pub(crate) async fn reserve(&self) -> Option<mpsc::Permit<'_, Msg>> {
        self.bg.reserve().await.ok()
    }

    /// A receiver of the node's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The event sender, for parts of the node that report events of their own.
    pub(crate) fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Stops the actor once the jobs queued before this call have run, and closes the
    /// store. Jobs queued later are dropped; their callers get [`EngineError::Stopped`].
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Why [`EngineClient::try_submit`] did not queue a job.
pub(crate) enum TrySubmit {
    /// The queue is full: the job, to try again later.
    Full(Job),
    /// The engine stopped.
    Stopped,
}

/// Sends `job` through a permit from [`EngineClient::reserve`].
pub(crate) fn send_with(permit: mpsc::Permit<'_, Msg>, job: Job) {
    permit.send(Msg::Job(job));
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use rapport_protocol::Kind;

    use super::*;
    use crate::store::Store;

    /// An engine actor on a new store, held busy by a call until `release` is dropped,
    /// so its queues fill behind it.
    async fn held_engine() -> (
        tempfile::TempDir,
        EngineClient,
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::create(dir.path(), Kind::Org, "Acme", 1_800_000_000).unwrap());
        let client =
            EngineClient::start(Engine::open(Store::open(dir.path()).unwrap()).unwrap()).unwrap();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let c = client.clone();
        let held = tokio::spawn(async move {
            c.call(move |_| {
                let _ = started_tx.send(());
                let _ = wait.recv();
            })
            .await
            .unwrap();
        });
        started.await.unwrap();
        (dir, client, release, held)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_runs_before_the_background_work_queued_ahead_of_it() {
        let (_dir, client, release, held) = held_engine().await;

        let order = Arc::new(Mutex::new(Vec::new()));
        let peers_jobs = 500;
        for i in 0..peers_jobs {
            let o = order.clone();
            let job: Job = Box::new(move |_| {
                o.lock().unwrap().push(i);
                Box::new(|_| {})
            });
            assert!(
                client.try_submit(job).is_ok(),
                "the background queue has room"
            );
        }
        let o = order.clone();
        let c = client.clone();
        let call = tokio::spawn(async move {
            c.call(move |_| o.lock().unwrap().push(usize::MAX))
                .await
                .unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.queued() < peers_jobs + 1 {
            assert!(Instant::now() < deadline, "the call was never queued");
            tokio::time::sleep(Duration::from_millis(2)).await; // backoff between polls
        }
        drop(release);
        held.await.unwrap();
        call.await.unwrap();
        client.stop().await;
        let order = order.lock().unwrap();
        assert_eq!(order.len(), peers_jobs + 1, "every job ran");
        assert_eq!(
            order[0],
            usize::MAX,
            "the caller's operation runs before the peers' work queued ahead of it"
        );
    }

    /// A stop that finds more network work queued than one group takes still runs all of
    /// it, as the loop promises: it used to run one group's worth and drop the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_runs_every_job_the_network_queued_before_it() {
        let (_dir, client, release, held) = held_engine().await;
        let ran = Arc::new(Mutex::new(0usize));
        let jobs = 2 * MAX_GROUP + 10;
        for _ in 0..jobs {
            let r = ran.clone();
            let job: Job = Box::new(move |_| {
                *r.lock().unwrap() += 1;
                Box::new(|_| {})
            });
            assert!(client.try_submit(job).is_ok(), "the queue has room");
        }
        // The stop is queued behind the held call, ahead of the run of the network's jobs.
        let c = client.clone();
        let stopping = tokio::spawn(async move { c.stop().await });
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.queued() < jobs + 1 {
            assert!(Instant::now() < deadline, "the stop was never queued");
            tokio::time::sleep(Duration::from_millis(2)).await; // backoff between polls
        }
        drop(release);
        held.await.unwrap();
        stopping.await.unwrap();
        assert_eq!(
            *ran.lock().unwrap(),
            jobs,
            "every queued job ran before the stop"
        );
    }
}
