//! The node's one clock and one source of randomness. The engine reads both only through
//! [`Sources`], so a test or a simulation can set time and make randomness repeatable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rapport_protocol::UnixSeconds;
use sha2::{Digest, Sha256};

/// Tells the time, in Unix seconds.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> UnixSeconds;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixSeconds {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that says what it was last set to: for tests of expiry and retention.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `t`.
    pub fn at(t: UnixSeconds) -> Self {
        Self(AtomicU64::new(t))
    }

    /// Sets the time.
    pub fn set(&self, t: UnixSeconds) {
        self.0.store(t, Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixSeconds {
        self.0.load(Ordering::SeqCst)
    }
}

/// The randomness source failed.
#[derive(Debug, thiserror::Error)]
#[error("the random source failed: {0}")]
pub struct EntropyError(pub String);

/// Fills buffers with random bytes (keys, nonces).
pub trait Entropy: Send + Sync {
    /// Fills `buf`.
    fn fill(&self, buf: &mut [u8]) -> Result<(), EntropyError>;
}

/// The operating system's random source.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, buf: &mut [u8]) -> Result<(), EntropyError> {
        getrandom::fill(buf).map_err(|e| EntropyError(e.to_string()))
    }
}

/// Repeatable bytes from a seed (SHA-256 in counter mode): for tests and simulations only,
/// never for a node that keeps secrets.
#[derive(Debug)]
pub struct SeededEntropy {
    seed: [u8; 32],
    counter: AtomicU64,
}

impl SeededEntropy {
    /// A source that yields the same bytes for the same seed.
    pub fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }
}

impl Entropy for SeededEntropy {
    fn fill(&self, buf: &mut [u8]) -> Result<(), EntropyError> {
        for chunk in buf.chunks_mut(32) {
            let n = self.counter.fetch_add(1, Ordering::SeqCst);
            let block = Sha256::new()
                .chain_update(self.seed)
                .chain_update(n.to_be_bytes())
                .finalize();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}

/// Where a node gets time and randomness.
#[derive(Clone)]
pub struct Sources {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The random source.
    pub entropy: Arc<dyn Entropy>,
}

impl Sources {
    /// The system clock and the OS random source.
    pub fn system() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            entropy: Arc::new(OsEntropy),
        }
    }
}

impl Default for Sources {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}
