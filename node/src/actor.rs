//! The engine actor: one thread owns the [`Engine`] (and through it the store) and runs
//! every operation on it, one after another, from one bounded queue.
//!
//! Everything else holds an [`EngineClient`]: the local API and embedding programs await
//! an operation's value ([`EngineClient::call`]); the network loop hands over a job whose
//! results come back to it as messages and never waits ([`EngineClient::try_submit`]).
//!
//! Operations are run in groups: the actor takes every job waiting in the queue (up to
//! [`MAX_GROUP`]), runs them, then makes all their writes durable with one sync of the
//! store (group commit, [`Engine::begin_group`]). Only then does any of them answer, so a
//! value, an answer to a peer or an event is never seen before what it reports is on disk.
//! If the sync fails, every operation of the group gets the error and the engine reloads
//! its documents from the store.

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
    tx: mpsc::Sender<Msg>,
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

fn run(mut engine: Engine, mut rx: mpsc::Receiver<Msg>, stats: Arc<Counters>) {
    let micros = |since: Instant| u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut stop = None;
    while stop.is_none() {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut jobs = Vec::new();
        match first {
            Msg::Job(j) => jobs.push(j),
            Msg::Stop(reply) => stop = Some(reply),
        }
        while stop.is_none() && jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => jobs.push(j),
                Ok(Msg::Stop(reply)) => stop = Some(reply),
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // A panic here (outside `rapport_protocol::contain`) may leave memory that does not
        // match the store: stop the process loudly; everything acknowledged is on disk.
        let group_started = Instant::now();
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| match engine.refresh() {
            Ok(()) => {
                engine.begin_group();
                let done: Vec<Done> = jobs
                    .into_iter()
                    .map(|job| {
                        let started = Instant::now();
                        let d = job(Ok(&mut engine));
                        stats.jobs.fetch_add(1, Ordering::Relaxed);
                        stats
                            .max_job_us
                            .fetch_max(micros(started), Ordering::Relaxed);
                        d
                    })
                    .collect();
                (done, engine.end_group())
            }
            Err(e) => {
                let done: Vec<Done> = jobs.into_iter().map(|job| job(Err(&e))).collect();
                (done, Err(e))
            }
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
    }
    // Jobs still queued are dropped: their callers hear that the engine stopped.
    drop(rx);
    drop(engine);
    if let Some(reply) = stop {
        let _ = reply.send(());
    }
}

impl EngineClient {
    /// Starts the actor thread, which owns `engine` from now on (a running [`crate::Node`]
    /// starts its own; this is for programs that use an engine without the network).
    pub fn start(engine: Engine) -> std::io::Result<EngineClient> {
        let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
        let events = engine.event_sender();
        let stats = Arc::new(Counters::default());
        let counters = stats.clone();
        std::thread::Builder::new()
            .name("rapport-engine".into())
            .spawn(move || run(engine, rx, counters))?;
        Ok(EngineClient { tx, events, stats })
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

    /// Operations waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
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

    /// Queues `job` if there is room; hands it back if the queue is full. Never waits.
    pub(crate) fn try_submit(&self, job: Job) -> Result<(), TrySubmit> {
        match self.tx.try_send(Msg::Job(job)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Msg::Job(job))) => Err(TrySubmit::Full(job)),
            Err(_) => Err(TrySubmit::Stopped),
        }
    }

    /// Room in the queue for one job, when there is some (for a loop that must not wait).
    pub(crate) async fn reserve(&self) -> Option<mpsc::Permit<'_, Msg>> {
        self.tx.reserve().await.ok()
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
