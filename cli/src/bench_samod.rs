//! The reference peer of `rapport bench sync`: two samod repos (the Rust automerge-repo)
//! syncing the very same Automerge changes over TCP on 127.0.0.1, with samod's own
//! length-delimited TCP transport. samod signs and checks nothing, and keeps its documents in
//! memory here (its `InMemoryStorage`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use rapport_protocol::automerge::{Automerge, Change, ChangeHash, ReadDoc};
use samod::{BackoffConfig, DocumentId, Repo, Url};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What one samod sync took.
pub(crate) struct SamodRun {
    /// From repo B dialling until it holds every head of every document.
    pub(crate) secs: f64,
    /// Bytes on the TCP connection, both directions, counted on repo A's side.
    pub(crate) wire: u64,
}

/// Repo A holds one document per entry of `docs`, built from exactly those changes; repo B
/// holds nothing. Times B dialling A over TCP until B holds all heads of every document.
pub(crate) async fn sync(docs: &[Vec<Change>], limit: Duration) -> Result<SamodRun> {
    let a = Repo::build_tokio().load().await;
    let b = Repo::build_tokio().load().await;
    let mut want: Vec<(DocumentId, Vec<ChangeHash>)> = Vec::with_capacity(docs.len());
    for cs in docs {
        let mut doc = Automerge::new();
        doc.apply_changes(cs.iter().cloned())?;
        let heads = doc.get_heads();
        // Non-empty, so samod adds no change of its own.
        let handle = a
            .create(doc)
            .await
            .map_err(|_| anyhow!("samod repo A stopped"))?;
        want.push((handle.document_id().clone(), heads));
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = Url::parse(&format!("tcp://{}", listener.local_addr()?))?;
    let acceptor = a
        .make_acceptor(url.clone())
        .map_err(|_| anyhow!("samod repo A stopped"))?;
    let wire = Arc::new(AtomicU64::new(0));
    let counter = wire.clone();
    let accepting = tokio::spawn(async move {
        let (io, _) = listener.accept().await?;
        acceptor
            .accept_tokio_io(Counted { io, bytes: counter })
            .map_err(|_| anyhow!("samod repo A stopped"))?;
        Ok::<_, anyhow::Error>(acceptor)
    });

    let start = Instant::now();
    let dialer = b
        .dial_tcp(url, BackoffConfig::default())
        .map_err(|e| anyhow!("samod dial: {e}"))?;
    dialer
        .established()
        .await
        .map_err(|e| anyhow!("samod dial: {e:?}"))?;
    let mut waits = tokio::task::JoinSet::new();
    for (id, heads) in want {
        waits.spawn(holds(b.clone(), id, heads));
    }
    let all = async {
        while let Some(r) = waits.join_next().await {
            r.context("a samod wait panicked")??;
        }
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(limit, all).await {
        Ok(r) => r?,
        Err(_) => bail!("samod did not sync within {} s", limit.as_secs()),
    }
    let secs = start.elapsed().as_secs_f64();
    let wire = wire.load(Ordering::Relaxed);

    dialer.close();
    b.stop().await;
    let acceptor = accepting.await.context("the samod acceptor panicked")??;
    acceptor.close();
    a.stop().await;
    Ok(SamodRun { secs, wire })
}

/// Waits until `repo` has the document and every one of `heads` in it.
async fn holds(repo: Repo, id: DocumentId, heads: Vec<ChangeHash>) -> Result<()> {
    let handle = repo
        .find(id.clone())
        .await
        .map_err(|_| anyhow!("samod repo B stopped"))?
        .with_context(|| format!("samod repo B could not find document {id}"))?;
    // Subscribe before looking, so that no change between the two is missed.
    let mut changed = handle.changes();
    loop {
        let heads = heads.clone();
        let have = handle
            .with_document_async(move |d| heads.iter().all(|h| d.get_change_by_hash(h).is_some()))
            .await
            .map_err(|_| anyhow!("samod repo B stopped"))?;
        if have {
            return Ok(());
        }
        if changed.next().await.is_none() {
            bail!("samod document {id} closed before it synced");
        }
    }
}

/// A TCP stream that counts the bytes it reads and writes.
struct Counted<S> {
    io: S,
    bytes: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.bytes.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.bytes.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
