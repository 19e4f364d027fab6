//! The local API of a running node: the event stream, the OpenAPI document against the
//! routes actually served, and bad input.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rapport_node::{OPENAPI_PATH, ROUTES, TOKEN_FILE};
use rapport_protocol::Kind;
use rapport_tests::{TestNode, consent_to, open, send};

fn token(n: &TestNode) -> String {
    std::fs::read_to_string(n.dir.join(TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned()
}

/// One HTTP/1.1 request on loopback; returns (status, body).
fn request(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_bad_input_gets_a_clear_error() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let addr = alice.node.api_addr().unwrap();
    let t = token(&alice);
    let doc = tokio::task::spawn_blocking(move || request(addr, "GET", OPENAPI_PATH, "", ""))
        .await
        .unwrap();
    assert_eq!(doc.0, 200);
    let spec: serde_json::Value = serde_json::from_str(&doc.1).unwrap();
    for (method, path, _) in ROUTES {
        assert!(
            spec["paths"][path][method].is_object(),
            "{method} {path} is missing from the OpenAPI document"
        );
        if *path == "/v1/events" {
            continue;
        }
        let concrete = path
            .replace("{id}", "abcd1234")
            .replace("{peer}", &alice.id().to_string());
        let (m, p, t2) = (method.to_uppercase(), concrete.clone(), t.clone());
        let (status, body) = tokio::task::spawn_blocking(move || request(addr, &m, &p, &t2, "{}"))
            .await
            .unwrap();
        // Served: anything but "no such route"; errors are JSON with a message.
        assert!(
            !body.contains("no such route"),
            "{method} {concrete} is documented but not served"
        );
        if status >= 400 && status != 422 && status != 415 {
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{method} {concrete}: {status} {body}"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        }
    }
    // Bad input: a clear error, nothing written.
    let t2 = t.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        request(
            addr,
            "POST",
            "/v1/consent/grants",
            &t2,
            r#"{"grantee":"not-an-identity","scopes":["contact:support"],"purpose":"x"}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("not base58") || body.contains("identity"),
        "{body}"
    );
    let t3 = t.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        request(
            addr,
            "POST",
            "/v1/consent/import",
            &t3,
            r#"{"format":"rapport-ledger/1"}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(alice.handle.read(|e| e.grants(0).len()).await, 0);

    // Names: answered per peer, bounded in count; a bad id is a clear error.
    let me = alice.id().to_string();
    let t4 = t.clone();
    let asked = serde_json::json!({"peers": [me]}).to_string();
    let (status, body) =
        tokio::task::spawn_blocking(move || request(addr, "POST", "/v1/names", &t4, &asked))
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
    let named: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(named[0]["identity"], me.as_str(), "{body}");
    let too_many = serde_json::json!({"peers": vec![me.clone(); 10_001]}).to_string();
    let t5 = t.clone();
    let (status, body) =
        tokio::task::spawn_blocking(move || request(addr, "POST", "/v1/names", &t5, &too_many))
            .await
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 10000"), "{body}");
    let (status, body) = tokio::task::spawn_blocking(move || {
        request(
            addr,
            "POST",
            "/v1/names",
            &t,
            r#"{"peers":["12D3KooWnope"]}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_carries_new_messages() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme").await;
    alice.connect(&acme).await;
    consent_to(&alice, &[&acme]).await;
    let rel = open(&alice, &[&acme]).await;
    let addr = alice.node.api_addr().unwrap();
    let t = token(&alice);
    // Subscribe over HTTP, then have Acme write.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n"
        )
        .unwrap();
        let reader = BufReader::new(s);
        for line in reader.lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    // The node subscribes before it answers: once the status line is here, the stream
    // carries every event from then on.
    let status = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("/v1/events answers within 20s");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    send(&acme.handle, &rel, "hello over the stream", Some("support")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut saw_event = false;
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("event: message") => saw_event = true,
            Ok(line) if saw_event && line.contains("hello over the stream") => return,
            _ => {}
        }
    }
    panic!("no message event on /v1/events");
}

/// One HTTP/1.1 request with a chosen content type; returns (status, content type, body).
fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server may answer before it has read a body it refuses.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// What a case sends and the status it must get: (what, method, path, content type, body,
/// status).
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
);

/// Whatever a client gets wrong, the answer is the API's error shape: a JSON object whose
/// `error` says what was wrong, with a 4xx status, never a bare text or an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_the_api_gives_is_its_json_error_shape() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let addr = alice.node.api_addr().unwrap();
    let t = token(&alice);
    let json = "application/json";
    let huge = vec![b' '; 2 << 20];
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "POST",
            "/v1/consent/grants",
            json,
            b"{not json".to_vec(),
            400,
        ),
        (
            "missing fields",
            "POST",
            "/v1/consent/grants",
            json,
            b"{}".to_vec(),
            422,
        ),
        (
            "not JSON at all",
            "POST",
            "/v1/consent/grants",
            "text/plain",
            b"hello".to_vec(),
            415,
        ),
        (
            "a bad query",
            "GET",
            "/v1/inbox?limit=many",
            json,
            Vec::new(),
            400,
        ),
        (
            "an unknown route",
            "GET",
            "/v1/nothing-here",
            json,
            Vec::new(),
            404,
        ),
        (
            "a wrong method",
            "DELETE",
            "/v1/inbox",
            json,
            Vec::new(),
            405,
        ),
        (
            "a body over the limit",
            "POST",
            "/v1/relationships/abcd/messages",
            json,
            huge,
            413,
        ),
    ];
    for (what, method, path, ctype, body, want) in cases {
        let (m, p, c, tok) = (
            method.to_owned(),
            path.to_owned(),
            ctype.to_owned(),
            t.clone(),
        );
        let (status, got_type, text) =
            tokio::task::spawn_blocking(move || raw(addr, &m, &p, &tok, &c, &body))
                .await
                .unwrap();
        assert_eq!(status, want, "{what}: {text}");
        assert!(
            got_type.starts_with("application/json"),
            "{what}: content type {got_type:?}, body {text:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
        let error = v["error"].as_str().unwrap_or_default();
        assert!(!error.trim().is_empty(), "{what}: no error text: {text}");
    }
    // Without the token as well.
    let (status, got_type, text) = tokio::task::spawn_blocking(move || {
        raw(addr, "GET", "/v1/inbox", "wrong", "application/json", b"")
    })
    .await
    .unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(got_type.starts_with("application/json"), "{text}");
}
