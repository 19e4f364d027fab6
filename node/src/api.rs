//! The local API: HTTP/JSON on loopback, for the CLI and for programs a user runs (a
//! dashboard, a company's CRM bridge). Every route but the OpenAPI document needs
//! `Authorization: Bearer <token>`, the token being the `api-token` file in the data
//! directory (mode 0600). Errors are `{"error": "..."}` with a 4xx or 5xx status.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rapport_protocol::{
    EntryId, IdentityKey, LegalBasis, MAX_LEDGER_FILE_BYTES, Scope, UnixSeconds,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{EngineError, GrantArgs};
use crate::node::NodeHandle;
use crate::views::{Event, WriteOutcome};

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";
/// The largest JSON body accepted, except ledger imports.
pub(crate) const MAX_BODY: usize = 1 << 20;
/// How long a write waits for the peers it concerns, unless `?wait=` says otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// Connections the API serves at once. Any local process can open sockets without the
/// token; past this number, the oldest connection that has made no authorised request is
/// closed to make room, so the owner's request always gets in, and the API never holds
/// more than this many descriptors.
pub(crate) const MAX_API_CONNECTIONS: usize = 128;
/// How long a client has to send a request's headers, and how long a connection may sit
/// idle between requests; a half-sent request is closed after it.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Set on a connection once it has made an authorised request: such a connection (the
/// owner's CLI, web app or event stream) is never closed to make room for another.
#[derive(Clone)]
struct Trusted(Arc<AtomicBool>);

/// A connection being served.
struct Conn {
    id: u64,
    trusted: Arc<AtomicBool>,
    close: tokio::sync::oneshot::Sender<()>,
}

type Conns = Arc<Mutex<VecDeque<Conn>>>;

/// Closes the oldest connection that made no authorised request, if the API is at its
/// limit; false if it is at its limit with every connection trusted.
fn make_room(conns: &Conns, always: bool) -> bool {
    let Ok(mut list) = conns.lock() else {
        return false;
    };
    if list.len() < MAX_API_CONNECTIONS && !always {
        return true;
    }
    match list.iter().position(|c| !c.trusted.load(Ordering::Relaxed)) {
        Some(i) => {
            if let Some(c) = list.remove(i) {
                let _ = c.close.send(());
            }
            true
        }
        None => list.len() < MAX_API_CONNECTIONS,
    }
}

/// Serves the API on `listener` until `stop` fires: HTTP/1.1 with a timeout on request
/// headers and idle connections ([`HEADER_TIMEOUT`]) and at most [`MAX_API_CONNECTIONS`]
/// connections, making room for newcomers by closing untrusted ones. On `stop`, requests
/// under way finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let conns: Conns = Arc::default();
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let mut next_id = 0u64;
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (or another transient error): free one, if an
                    // untrusted connection holds it, and try again shortly.
                    tracing::warn!("the local API cannot accept a connection: {e}");
                    make_room(&conns, true);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !make_room(&conns, false) {
            tracing::warn!("the local API is at its limit of {MAX_API_CONNECTIONS} connections");
            continue;
        }
        let id = next_id;
        next_id += 1;
        let trusted = Arc::new(AtomicBool::new(false));
        let (close, closed) = tokio::sync::oneshot::channel();
        if let Ok(mut list) = conns.lock() {
            list.push_back(Conn {
                id,
                trusted: trusted.clone(),
                close,
            });
        }
        let app = router.clone().layer(axum::Extension(Trusted(trusted)));
        let conn = http.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(app),
        );
        let mut shutdown = shutdown.subscribe();
        let conns = conns.clone();
        tasks.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("an API connection ended: {e}");
                    }
                }
                // Closed to make room: dropped at once.
                _ = closed => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            if let Ok(mut list) = conns.lock() {
                list.retain(|c| c.id != id);
            }
        });
    }
    let _ = shutdown.send(true);
    while tasks.join_next().await.is_some() {}
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    token: String,
}

/// An API error: status and message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Refused(_) => StatusCode::CONFLICT,
            EngineError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            EngineError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult = Result<Json<Value>, ApiError>;

fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(Json(serde_json::to_value(v).expect("views serialise")))
}

fn identity(s: &str) -> Result<IdentityKey, ApiError> {
    s.trim()
        .parse()
        .map_err(|e: rapport_protocol::IdentityError| bad(e.to_string()))
}

fn scopes(list: &[String]) -> Result<Vec<Scope>, ApiError> {
    list.iter()
        .map(|s| s.trim().parse::<Scope>().map_err(|e| bad(e.to_string())))
        .collect()
}

/// `?wait=SECONDS` (0-60) on writes: how long to wait for the peers concerned.
#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
    limit: Option<usize>,
}

impl WaitQuery {
    fn wait(&self) -> Duration {
        self.wait
            .map_or(DEFAULT_WAIT, |s| Duration::from_secs(s.min(60)))
    }
}

/// The API's routes: (method, path, summary). The OpenAPI document is built from this
/// list, and a test checks every entry is served.
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "get",
        "/v1/status",
        "This node: identity, kind, name, listen addresses",
    ),
    ("get", "/v1/peers", "Known and connected peers"),
    (
        "get",
        "/v1/invitation",
        "This node's invitation: {\"link\", \"identity\", \"name\", \"kind\", \"addrs\"}",
    ),
    ("get", "/v1/contacts", "Contacts, by petname"),
    (
        "post",
        "/v1/contacts",
        "Add (or update) a contact from its invitation, and connect to it: {\"link\", \"name\"?}",
    ),
    (
        "post",
        "/v1/contacts/resolve",
        "The peer a petname, invitation link or identity names; an identity this node never met needs new_peer: {\"peer\", \"new_peer\"?}",
    ),
    (
        "post",
        "/v1/names",
        "How this node names peers (a contact's petname, else a name a relationship gives, in quotes when self-given) and a contact's kind: {\"peers\": [identity, …]} (at most 10,000)",
    ),
    (
        "post",
        "/v1/contacts/rename",
        "Rename a contact: {\"contact\", \"name\"}",
    ),
    (
        "post",
        "/v1/contacts/remove",
        "Remove a contact (documents shared with it stay): {\"contact\"}",
    ),
    (
        "post",
        "/v1/peers",
        "Connect to a peer: {\"addr\": multiaddr}",
    ),
    (
        "get",
        "/v1/relationships",
        "Relationships, newest activity first",
    ),
    (
        "post",
        "/v1/relationships",
        "Open a relationship: {\"peer\", \"name\"?, \"title\"?, \"addr\"?}",
    ),
    (
        "get",
        "/v1/relationships/{id}",
        "One relationship: members, access, profile, threads, messages",
    ),
    (
        "post",
        "/v1/relationships/{id}/messages",
        "Send a message: {\"text\", \"purpose\"?, \"thread\"?}",
    ),
    (
        "post",
        "/v1/relationships/{id}/members",
        "Add a member (owner): {\"peer\", \"name\"?}",
    ),
    (
        "post",
        "/v1/relationships/{id}/removals",
        "Remove a member (owner); starts a new content-key epoch: {\"peer\"}",
    ),
    (
        "post",
        "/v1/relationships/{id}/profile",
        "Disclose a profile field (owner): {\"field\", \"value\"}",
    ),
    (
        "post",
        "/v1/relationships/{id}/threads",
        "Start a thread: {\"title\"}",
    ),
    (
        "get",
        "/v1/inbox",
        "Messages from others, newest first (?limit=)",
    ),
    ("get", "/v1/consent", "Grants given and held"),
    (
        "post",
        "/v1/consent/grants",
        "Grant: {\"grantee\", \"scopes\", \"purpose\", \"expires\"?, \"terms\"?, \"legal_basis\"?, \"notice_sha256\"?}",
    ),
    (
        "post",
        "/v1/consent/grants/{id}/amend",
        "Narrow a grant: {\"scopes\"?, \"expires\"?}; what is absent stays as the grant has it now",
    ),
    (
        "post",
        "/v1/consent/grants/{id}/revoke",
        "Revoke a grant: {\"reason\"?}",
    ),
    (
        "post",
        "/v1/consent/grants/{id}/erasure",
        "Acknowledge erasure (grantee): {\"erased\"?}",
    ),
    (
        "post",
        "/v1/consent/accept",
        "Accept pending grants (grantee): {\"grant\"?, \"customer\"?}",
    ),
    (
        "post",
        "/v1/consent/proffer",
        "Proffer terms: {\"grantee\", \"terms\"}",
    ),
    (
        "get",
        "/v1/consent/ledgers",
        "Every consent ledger, as rapport-ledger/1 files",
    ),
    (
        "get",
        "/v1/consent/ledgers/{peer}",
        "The ledger shared with one peer",
    ),
    (
        "post",
        "/v1/consent/import",
        "Verify and merge a ledger file (the body)",
    ),
    (
        "get",
        "/v1/refusals",
        "Changes this node refused, kept as evidence (?limit=)",
    ),
    (
        "get",
        "/v1/events",
        "Server-sent events: message, relationship, consent, refused, peer_refused, erased, peer_connected, peer_disconnected",
    ),
];

/// The OpenAPI 3.1 document of this API.
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .chain(
                (*method == "post")
                    .then(|| json!({"name": "wait", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 60}, "description": "seconds to wait for the peers concerned (default 5)"})),
            )
            .collect();
        let mut op = json!({
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": params,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
                "400": {"description": "Invalid request", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "401": {"description": "Missing or wrong bearer token"},
                "404": {"description": "Not found", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "409": {"description": "Refused by the rules", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if *method == "post" {
            op["requestBody"] = json!({"required": false, "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        if *path == "/v1/events" {
            op["responses"]["200"] = json!({"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}});
        }
        paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(method.to_string(), op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Rapport node local API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Loopback HTTP/JSON API of a Rapport node. Authenticate with the bearer token in the data directory's api-token file."
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}
        }
    })
}

/// The API router for a node, requiring `token`.
pub fn router(node: NodeHandle, token: String) -> Router {
    let state = AppState { node, token };
    let v1 = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers).post(connect))
        .route("/v1/invitation", get(invitation))
        .route("/v1/contacts", get(contacts).post(add_contact))
        .route("/v1/contacts/resolve", post(resolve_peer))
        .route("/v1/names", post(names))
        .route("/v1/contacts/rename", post(rename_contact))
        .route("/v1/contacts/remove", post(remove_contact))
        .route("/v1/relationships", get(relationships).post(open_rel))
        .route("/v1/relationships/{id}", get(relationship))
        .route("/v1/relationships/{id}/messages", post(send_message))
        .route("/v1/relationships/{id}/members", post(add_member))
        .route("/v1/relationships/{id}/removals", post(remove_member))
        .route("/v1/relationships/{id}/profile", post(set_profile))
        .route("/v1/relationships/{id}/threads", post(new_thread))
        .route("/v1/inbox", get(inbox))
        .route("/v1/consent", get(grants))
        .route("/v1/consent/grants", post(grant))
        .route("/v1/consent/grants/{id}/amend", post(amend))
        .route("/v1/consent/grants/{id}/revoke", post(revoke))
        .route("/v1/consent/grants/{id}/erasure", post(ack_erasure))
        .route("/v1/consent/accept", post(accept))
        .route("/v1/consent/proffer", post(proffer))
        .route("/v1/consent/ledgers", get(ledgers))
        .route("/v1/consent/ledgers/{peer}", get(ledger))
        .route(
            "/v1/consent/import",
            post(import).layer(DefaultBodyLimit::max(MAX_LEDGER_FILE_BYTES)),
        )
        .route("/v1/refusals", get(refusals))
        .route("/v1/events", get(events))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route(OPENAPI_PATH, get(|| async { Json(openapi()) }))
        .merge(v1)
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such route: see /openapi.json".into(),
            )
        })
        .with_state(state)
        .layer(middleware::from_fn(json_errors))
}

/// The most of a plain-text error body (an extractor's rejection) kept in the JSON error.
const MAX_REJECTION_TEXT: usize = 16 << 10;

/// Every failure gets the API's error shape, `{"error": "..."}`: axum's own rejections (a
/// body that is not JSON or lacks a field, a bad query, a body over the limit, a method
/// the route does not take) answer in plain text or with no body at all.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), MAX_REJECTION_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let text = if text.is_empty() {
        match status {
            StatusCode::METHOD_NOT_ALLOWED => {
                "this route does not take that method: see /openapi.json".to_owned()
            }
            s => s
                .canonical_reason()
                .unwrap_or("the request failed")
                .to_owned(),
        }
    } else {
        text
    };
    ApiError(status, text).into_response()
}

async fn auth(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison: the token is a secret.
    let expected = state.token.as_bytes();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        if let Some(Trusted(flag)) = req.extensions().get::<Trusted>() {
            flag.store(true, Ordering::Relaxed);
        }
    } else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see the api-token file in the node's data directory)"
                .into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn status(State(s): State<AppState>) -> ApiResult {
    let profile = s.node.query(|e| e.profile().clone()).await?;
    let listening = s.node.net().listening().await;
    let me = libp2p::PeerId::from_bytes(&s.node.identity().peer_id_bytes()).expect("PeerId");
    let stats = s.node.net().stats();
    ok(json!({
        "identity": profile.identity,
        "kind": profile.kind,
        "name": profile.name,
        "listen": listening.into_iter().map(|a| crate::net::with_peer(a, me).to_string()).collect::<Vec<_>>(),
        "sync_bytes_sent": stats.sent.load(std::sync::atomic::Ordering::Relaxed),
        "sync_bytes_received": stats.received.load(std::sync::atomic::Ordering::Relaxed),
        "net": {
            "dials": stats.dials.load(std::sync::atomic::Ordering::Relaxed),
            "lookups": stats.lookups.load(std::sync::atomic::Ordering::Relaxed),
            "sweeps": stats.sweeps.load(std::sync::atomic::Ordering::Relaxed),
        },
        "engine": s.node.engine().stats(),
        "relay": s.node.net().relay_status(),
    }))
}

async fn peers(State(s): State<AppState>) -> ApiResult {
    ok(s.node.net().peers().await)
}

async fn invitation(State(s): State<AppState>) -> ApiResult {
    let profile = s.node.query(|e| e.profile().clone()).await?;
    let listening = s.node.net().listening().await;
    let inv = rapport_protocol::Invitation::new(
        profile.identity,
        &profile.name,
        profile.kind,
        &invitation_addrs(listening),
    );
    ok(json!({
        "link": inv.to_string(),
        "identity": inv.identity,
        "name": inv.name,
        "kind": inv.kind,
        "addrs": inv.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
}

/// The addresses an invitation carries, best first: public ones, then relayed ones (they
/// work behind NAT), then private ones, then loopback (for peers on this machine). Those
/// on no interface (`0.0.0.0`) are left out.
pub(crate) fn invitation_addrs(mut addrs: Vec<libp2p::Multiaddr>) -> Vec<libp2p::Multiaddr> {
    use libp2p::multiaddr::Protocol;
    fn rank(a: &libp2p::Multiaddr) -> Option<u8> {
        if a.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return Some(1);
        }
        match a.iter().next()? {
            Protocol::Ip4(ip) if ip.is_unspecified() => None,
            Protocol::Ip6(ip) if ip.is_unspecified() => None,
            Protocol::Ip4(ip) if ip.is_loopback() => Some(3),
            Protocol::Ip6(ip) if ip.is_loopback() => Some(3),
            Protocol::Ip4(ip) if ip.is_private() || ip.is_link_local() => Some(2),
            Protocol::Ip6(ip) if (ip.segments()[0] & 0xfe00) == 0xfc00 => Some(2),
            Protocol::Ip6(ip) if (ip.segments()[0] & 0xffc0) == 0xfe80 => Some(2),
            _ => Some(0),
        }
    }
    addrs.retain(|a| rank(a).is_some());
    addrs.sort_by_key(rank);
    addrs
}

async fn contacts(State(s): State<AppState>) -> ApiResult {
    ok(s.node.query(crate::engine::Engine::contacts).await?)
}

/// Dials a contact's addresses in the background: a contact just added is met at once,
/// without holding the answer for it.
fn dial_all(s: &AppState, addrs: &[String]) {
    for a in addrs {
        let Ok(addr) = a.parse::<libp2p::Multiaddr>() else {
            continue;
        };
        let net = s.node.net().clone();
        tokio::spawn(async move {
            if let Err(e) = net.dial(addr.clone()).await {
                tracing::info!("could not reach {addr} yet: {e}");
            }
        });
    }
}

#[derive(Deserialize)]
struct AddContactBody {
    link: String,
    name: Option<String>,
}

async fn add_contact(State(s): State<AppState>, Json(b): Json<AddContactBody>) -> ApiResult {
    let (contact, new) = s
        .node
        .engine()
        .try_call(move |e| e.add_contact(&b.link, b.name, e.now()))
        .await?;
    let addrs: Vec<String> = contact
        .addrs
        .iter()
        .map(|a| format!("{a}/p2p/{}", contact.identity))
        .collect();
    dial_all(&s, &addrs);
    ok(json!({"contact": contact, "new": new}))
}

#[derive(Deserialize)]
struct ResolveBody {
    peer: String,
    #[serde(default)]
    new_peer: bool,
}

async fn resolve_peer(State(s): State<AppState>, Json(b): Json<ResolveBody>) -> ApiResult {
    let resolved = s
        .node
        .engine()
        .try_call(move |e| e.resolve_peer(&b.peer, b.new_peer, e.now()))
        .await?;
    if resolved.added.is_some() {
        dial_all(&s, &resolved.addrs);
    }
    ok(resolved)
}

#[derive(Deserialize)]
struct NamesBody {
    peers: Vec<String>,
}

async fn names(State(s): State<AppState>, Json(b): Json<NamesBody>) -> ApiResult {
    if b.peers.len() > crate::contacts::MAX_NAMES {
        return Err(bad(format!(
            "at most {} peers at once; {} were asked for",
            crate::contacts::MAX_NAMES,
            b.peers.len()
        )));
    }
    let peers = b
        .peers
        .iter()
        .map(|p| identity(p))
        .collect::<Result<Vec<_>, _>>()?;
    ok(s.node.query(move |e| e.names_of(&peers)).await?)
}

#[derive(Deserialize)]
struct RenameBody {
    contact: String,
    name: String,
}

async fn rename_contact(State(s): State<AppState>, Json(b): Json<RenameBody>) -> ApiResult {
    ok(s.node
        .engine()
        .try_call(move |e| e.rename_contact(&b.contact, b.name))
        .await?)
}

#[derive(Deserialize)]
struct RemoveBody {
    contact: String,
}

async fn remove_contact(State(s): State<AppState>, Json(b): Json<RemoveBody>) -> ApiResult {
    ok(s.node
        .engine()
        .try_call(move |e| e.remove_contact(&b.contact))
        .await?)
}

#[derive(Deserialize)]
struct ConnectBody {
    addr: String,
}

async fn connect(State(s): State<AppState>, Json(b): Json<ConnectBody>) -> ApiResult {
    let addr: libp2p::Multiaddr = b
        .addr
        .trim()
        .parse()
        .map_err(|e| bad(format!("{:?} is not a multiaddr: {e}", b.addr)))?;
    match s.node.net().dial(addr).await {
        Ok(peer) => ok(json!({"peer": peer.to_string()})),
        Err(e) => Err(ApiError(StatusCode::BAD_GATEWAY, e.to_string())),
    }
}

async fn relationships(State(s): State<AppState>) -> ApiResult {
    ok(s.node.query(crate::engine::Engine::relationships).await??)
}

#[derive(Deserialize)]
struct OpenBody {
    peer: String,
    name: Option<String>,
    title: Option<String>,
    addr: Option<String>,
}

async fn open_rel(
    State(s): State<AppState>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<OpenBody>,
) -> ApiResult {
    let peer = identity(&b.peer)?;
    if let Some(addr) = &b.addr {
        let addr: libp2p::Multiaddr = addr
            .trim()
            .parse()
            .map_err(|e| bad(format!("{addr:?} is not a multiaddr: {e}")))?;
        if let Err(e) = s.node.net().dial(addr).await {
            tracing::info!("could not connect to {peer} yet: {e}");
        }
    }
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| {
            e.open_relationship(peer, b.name, b.title, e.now())
        })
        .await?;
    let out = out.went(delivery);
    ok(out)
}

async fn relationship(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.node
        .query(move |e| e.relationship(&id, e.now()))
        .await??)
}

#[derive(Deserialize)]
struct MessageBody {
    text: String,
    purpose: Option<String>,
    thread: Option<String>,
}

async fn send_message(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<MessageBody>,
) -> ApiResult {
    let thread = b
        .thread
        .as_deref()
        .map(|t| {
            EntryId::from_hex(t.trim())
                .ok_or_else(|| bad(format!("{t:?} is not a thread id (64 hex digits)")))
        })
        .transpose()?;
    let (out, delivery): (WriteOutcome, _) = s
        .node
        .write(q.wait(), move |e| {
            e.send_message(&id, b.text, b.purpose, thread, e.now())
        })
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize)]
struct RemovalBody {
    peer: String,
}

async fn remove_member(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<RemovalBody>,
) -> ApiResult {
    let peer = identity(&b.peer)?;
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.remove_member(&id, peer, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize)]
struct MemberBody {
    peer: String,
    name: Option<String>,
}

async fn add_member(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<MemberBody>,
) -> ApiResult {
    let peer = identity(&b.peer)?;
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.add_member(&id, peer, b.name, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize)]
struct ProfileBody {
    field: String,
    value: String,
}

async fn set_profile(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<ProfileBody>,
) -> ApiResult {
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| {
            e.set_profile(&id, b.field, b.value, e.now())
        })
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize)]
struct ThreadBody {
    title: String,
}

async fn new_thread(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<ThreadBody>,
) -> ApiResult {
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.new_thread(&id, b.title, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

async fn inbox(State(s): State<AppState>, Query(q): Query<WaitQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(50).min(10_000);
    ok(s.node.query(move |e| e.inbox(limit)).await??)
}

async fn grants(State(s): State<AppState>) -> ApiResult {
    ok(s.node.query(|e| e.grants(e.now())).await?)
}

#[derive(Deserialize)]
struct GrantBody {
    grantee: String,
    scopes: Vec<String>,
    purpose: String,
    expires: Option<UnixSeconds>,
    terms: Option<String>,
    legal_basis: Option<String>,
    notice_sha256: Option<String>,
}

async fn grant(
    State(s): State<AppState>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<GrantBody>,
) -> ApiResult {
    let args = GrantArgs {
        grantee: identity(&b.grantee)?,
        scopes: scopes(&b.scopes)?,
        purpose: b.purpose,
        expires: b.expires,
        terms: b.terms,
        legal_basis: b
            .legal_basis
            .as_deref()
            .map(|l| l.parse::<LegalBasis>().map_err(bad))
            .transpose()?,
        notice_sha256: b.notice_sha256,
    };
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.grant(args, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize)]
struct AmendBody {
    /// The scopes that remain; absent: those the grant has now.
    scopes: Option<Vec<String>>,
    /// The new end; absent: the one the grant has now.
    expires: Option<UnixSeconds>,
}

async fn amend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<AmendBody>,
) -> ApiResult {
    let scopes = b.scopes.as_deref().map(scopes).transpose()?;
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.amend(&id, scopes, b.expires, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize, Default)]
struct RevokeBody {
    reason: Option<String>,
}

async fn revoke(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    body: Option<Json<RevokeBody>>,
) -> ApiResult {
    let reason = body.map(|Json(b)| b).unwrap_or_default().reason;
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.revoke(&id, reason, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize, Default)]
struct ErasureBody {
    erased: Option<String>,
}

async fn ack_erasure(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    body: Option<Json<ErasureBody>>,
) -> ApiResult {
    let erased = body
        .map(|Json(b)| b)
        .unwrap_or_default()
        .erased
        .unwrap_or_else(|| "all data held under this grant".into());
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.ack_erasure(&id, erased, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

#[derive(Deserialize, Default)]
struct AcceptBody {
    grant: Option<String>,
    customer: Option<String>,
}

async fn accept(
    State(s): State<AppState>,
    Query(q): Query<WaitQuery>,
    body: Option<Json<AcceptBody>>,
) -> ApiResult {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let customer = b.customer.as_deref().map(identity).transpose()?;
    let (rows, delivery) = s
        .node
        .write(q.wait(), move |e| {
            e.accept(b.grant.as_deref(), customer, e.now())
        })
        .await?;
    ok(json!({"accepted": rows, "delivery": delivery.summary(), "deliveries": delivery}))
}

#[derive(Deserialize)]
struct ProfferBody {
    grantee: String,
    terms: String,
}

async fn proffer(
    State(s): State<AppState>,
    Query(q): Query<WaitQuery>,
    Json(b): Json<ProfferBody>,
) -> ApiResult {
    let grantee = identity(&b.grantee)?;
    let (out, delivery) = s
        .node
        .write(q.wait(), move |e| e.proffer(grantee, &b.terms, e.now()))
        .await?;
    let out = out.went(delivery);
    ok(out)
}

async fn ledgers(State(s): State<AppState>) -> ApiResult {
    let files = s.node.query(crate::engine::Engine::ledger_files).await?;
    let parsed: Vec<Value> = files
        .iter()
        .map(|f| serde_json::from_str(f).expect("ledger files are JSON"))
        .collect();
    ok(parsed)
}

async fn ledger(State(s): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    let peer = identity(&peer)?;
    let file = s.node.query(move |e| e.export_ledger(&peer)).await??;
    ok(serde_json::from_str::<Value>(&file).expect("ledger files are JSON"))
}

async fn import(
    State(s): State<AppState>,
    Query(q): Query<WaitQuery>,
    body: axum::body::Bytes,
) -> ApiResult {
    let (applied, delivery) = s
        .node
        .write(q.wait(), move |e| e.import_ledger(&body, e.now()))
        .await?;
    ok(json!({"imported": applied, "delivery": delivery.summary(), "deliveries": delivery}))
}

async fn refusals(State(s): State<AppState>, Query(q): Query<WaitQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).min(10_000);
    ok(s.node.query(move |e| e.refusals(limit)).await??)
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Message(_) => "message",
        Event::Relationship { .. } => "relationship",
        Event::Consent { .. } => "consent",
        Event::Refused(_) => "refused",
        Event::PeerRefused { .. } => "peer_refused",
        Event::Erased { .. } => "erased",
        Event::MailRefused { .. } => "mail_refused",
        Event::PeerConnected { .. } => "peer_connected",
        Event::PeerDisconnected { .. } => "peer_disconnected",
    }
}

async fn events(State(s): State<AppState>) -> impl IntoResponse {
    let rx = s.node.subscribe().await;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let sse = match rx.recv().await {
            Ok(ev) => SseEvent::default()
                .event(event_name(&ev))
                .json_data(&ev)
                .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event")),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                SseEvent::default().event("lagged").data(n.to_string())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(sse), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
