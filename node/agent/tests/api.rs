//! The local HTTP API: authentication, answers and error shapes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vcfed::client::{ApiClient, ClientError};

struct Running {
    site: common::Site,
    client: ApiClient,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(nodes: u32) -> Running {
        let site = common::Site::init("site-a", nodes);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = vcfed::agent::start(site.config(), async move {
            let _ = stopped.await;
        })
        .await
        .expect("the agent starts");
        let client = site.client();
        common::wait_ready(&client).await;
        Running {
            site,
            client,
            stop: Some(stop),
            task: agent.task,
        }
    }

    async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, bytes) = self
            .client
            .raw(method, path, body.as_ref())
            .await
            .expect("the agent answers");
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {bytes:?}"));
        (status, value)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test]
async fn requests_need_the_bearer_token() {
    let running = Running::start(4).await;
    let addr = running.client.addr();

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /v1/site HTTP/1.1\r\nHost: vcfed\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{response}"
    );
    assert!(
        response.contains(r#"{"error":{"code":"unauthorized""#),
        "{response}"
    );

    // Without the token, the body is not waited for (nor buffered): a
    // request announcing 60000 bytes and sending none is answered 401 at
    // once, not after the client timeout (10 s).
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/reservations HTTP/1.1\r\nHost: vcfed\r\nContent-Type: application/json\r\n\
              Content-Length: 60000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        stream.read_exact(&mut head),
    )
    .await
    .expect("401 before the body")
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");

    let wrong = ApiClient::new(addr, "not-the-token".into());
    match wrong.get::<Value>("/v1/site").await {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(code, "unauthorized");
        }
        other => panic!("expected 401, got {other:?}"),
    }

    let (status, site) = running.raw(Method::GET, "/v1/site", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(site["name"], "site-a");
    assert_eq!(site["capacity"]["nodes"], 4);
    let keys = vcfed::identity::load(&vcfed::agent::key_paths(&running.site.config())).unwrap();
    assert_eq!(site["peer_id"], keys.peer_id().to_string());
    assert_eq!(site["tunnel_public_key"], keys.tunnel_public_key());
    running.stop().await;
}

#[tokio::test]
async fn holds_commits_and_capacity_steps() {
    let running = Running::start(4).await;
    // Windows a day ahead, on a round number so that the steps read well.
    let t = (vcfed::time::now_ms() / 1_000_000 + 100) * 1_000_000;
    let hold = json!({"key": "k1", "cluster_id": "c1", "start": t + 1_000_000, "end": t + 2_000_000, "nodes": 3, "lease_s": 60});
    let (status, held) = running
        .raw(Method::POST, "/v1/reservations", Some(hold.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    assert_eq!(held["state"], "held");
    let (status, again) = running
        .raw(Method::POST, "/v1/reservations", Some(hold.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again, held, "a retried hold returns the same reservation");

    let other = json!({"key": "k2", "cluster_id": "c2", "start": t + 1_500_000, "end": t + 2_500_000, "nodes": 2});
    let (status, body) = running
        .raw(Method::POST, "/v1/reservations", Some(other))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(code(&body), "insufficient_capacity");
    assert_eq!(body["error"]["available"], 1);

    let conflicting = json!({"key": "k1", "cluster_id": "c1", "start": t + 1_000_000, "end": t + 2_000_000, "nodes": 1});
    let (status, body) = running
        .raw(Method::POST, "/v1/reservations", Some(conflicting))
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"));

    let (status, body) = running
        .raw(
            Method::POST,
            "/v1/reservations/k1/commit",
            Some(json!({"requester": "site-x"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "not_owner"));
    let (status, committed) = running
        .raw(Method::POST, "/v1/reservations/k1/commit", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{committed}");
    assert_eq!(committed["state"], "committed");

    let (status, report) = running
        .raw(
            Method::GET,
            &format!("/v1/capacity?from={t}&to={}", t + 3_000_000),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let steps: Vec<(i64, u64)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["at_ms"].as_i64().unwrap(), s["free"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps, [(t, 4), (t + 1_000_000, 1), (t + 2_000_000, 4)]);

    let (status, list) = running
        .raw(Method::GET, "/v1/reservations?state=all", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, released) = running
        .raw(Method::POST, "/v1/reservations/k1/release", None)
        .await;
    assert_eq!(
        (status, released["state"].as_str()),
        (StatusCode::OK, Some("released"))
    );
    let (_, events) = running.raw(Method::GET, "/v1/events", None).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.ends_with(&[
            "reservation.held",
            "reservation.committed",
            "reservation.released"
        ]),
        "{kinds:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_hold_in_the_past_is_refused_with_a_minute_of_slack() {
    let running = Running::start(4).await;
    let now = vcfed::time::now_ms();
    let hour = 3_600_000;
    let hold = |key: &str, start: i64, end: i64| json!({"key": key, "cluster_id": "c", "start": start, "end": end, "nodes": 1});
    for (key, start, end) in [
        // `--start 2026` read as unix ms: January 1970.
        ("ms", 2026, 2026 + 2 * hour),
        ("started", now - 10 * 60_000, now + hour),
        ("ended", now - 2 * hour, now - hour),
    ] {
        let (status, body) = running
            .raw(
                Method::POST,
                "/v1/reservations",
                Some(hold(key, start, end)),
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{key}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("the window starts in the past"),
            "{key}: {message}"
        );
    }
    let (status, body) = running
        .raw(
            Method::POST,
            "/v1/reservations",
            Some(json!({"key": "text", "cluster_id": "c", "start": "2026", "end": "+1h", "nodes": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("looks like a year"),
        "{body}"
    );
    // A "now" computed by a client a few seconds ago is still fine.
    let (status, body) = running
        .raw(
            Method::POST,
            "/v1/reservations",
            Some(hold("recent", now - 30_000, now + hour)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, list) = running
        .raw(Method::GET, "/v1/reservations?state=all", None)
        .await;
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["recent"]);
    running.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let running = Running::start(2).await;
    // A window that is fine, so that each case fails for its own reason.
    let (start, end) = ("+1h", "+2h");
    let cases: Vec<(Method, &str, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::GET,
            "/v1/nope",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/site",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/capacity?from=tomorrow",
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/capacity?from=20000&to=10000",
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/capacity?bogus=1",
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/reservations?state=maybe",
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/reservations/none",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/reservations/none/commit",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/reservations",
            Some(json!({"key": "k"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/reservations",
            Some(json!({"key": "k", "cluster_id": "c", "start": start, "end": end, "nodes": 0})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/reservations",
            Some(
                json!({"key": "k", "cluster_id": "c", "start": start, "end": end, "nodes": 1, "lease_s": 0}),
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/reservations",
            Some(
                json!({"key": "k", "cluster_id": "c", "start": start, "end": end, "nodes": 1,
                        "shape": {"cores": 64, "memory_mib": 1, "disk_gib": 1}}),
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, path, body, status, expected) in cases {
        let (got, value) = running.raw(method.clone(), path, body).await;
        assert_eq!(
            (got, code(&value)),
            (status, expected),
            "{method} {path}: {value}"
        );
        assert!(!value["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, list) = running
        .raw(Method::GET, "/v1/reservations?state=all", None)
        .await;
    assert_eq!(
        (status, list),
        (StatusCode::OK, json!([])),
        "bad requests hold nothing"
    );
    running.stop().await;
}

/// Every path of docs/openapi.yaml is served (no fallback 404 or 405), and
/// every route the agent serves is in the document.
#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/openapi.yaml"
    ))
    .unwrap();
    let mut documented: Vec<(String, String)> = Vec::new();
    let mut path: Option<String> = None;
    for line in doc.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(method) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':'))
            && ["get", "post", "put", "delete", "patch"].contains(&method)
        {
            documented.push((
                method.to_uppercase(),
                path.clone().expect("a method under a path"),
            ));
        }
    }
    // The routes as the router declares them in src/api.rs.
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api.rs")).unwrap();
    let mut served: Vec<(String, String)> = Vec::new();
    for (start, _) in source.match_indices(".route(") {
        // The whole call, however rustfmt wrapped it: up to the matching ')'.
        let mut depth = 0;
        let mut end = start;
        for (offset, c) in source[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + offset;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call: String = source[start..end].split_whitespace().collect();
        let path = call
            .trim_start_matches(".route(\"")
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        for method in ["get", "post", "put", "delete", "patch"] {
            if call.contains(&format!(",{method}(")) || call.contains(&format!(".{method}(")) {
                served.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    assert!(served.len() >= 10, "found only {served:?} in src/api.rs");
    documented.sort();
    served.sort();
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and the routes differ"
    );

    let running = Arc::new(Running::start(1).await);
    for (method, path) in &documented {
        let concrete = path.replace("{key}", "some-key");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (_, body) = running
            .client
            .raw(method.clone(), &concrete, Some(&json!({})))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("no such endpoint") && !text.contains("method_not_allowed"),
            "{method} {path}: {text}"
        );
    }
}

/// `GET path` without a token, over a raw connection: the status and the body.
async fn get_without_token(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: vcfed\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn health_is_open_and_metrics_show_what_the_ledger_holds() {
    let running = Running::start(4).await;
    let addr = running.client.addr();

    assert_eq!(
        get_without_token(addr, "/healthz").await,
        (200, "ok\n".to_owned())
    );
    let (status, _) = get_without_token(addr, "/metrics").await;
    assert_eq!(status, 401, "metrics need the token");

    let t = vcfed::time::now_ms();
    let hold = json!({"key": "k1", "cluster_id": "c1", "start": t + 1_000_000, "end": t + 2_000_000, "nodes": 3});
    let (status, held) = running
        .raw(Method::POST, "/v1/reservations", Some(hold))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{held}");

    let (status, bytes) = running
        .client
        .raw(Method::GET, "/metrics", None::<&Value>)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let samples = common::parse_exposition(&text);
    let value = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value(r#"vcfed_reservations{state="held"}"#), 1.0);
    assert_eq!(value(r#"vcfed_reservations{state="committed"}"#), 0.0);
    assert_eq!(value(r#"vcfed_reservations{state="expired"}"#), 0.0);
    assert_eq!(value(r#"vcfed_clusters{state="running"}"#), 0.0);
    // A lone site sees itself, alive, and no peer.
    assert_eq!(value(r#"vcfed_federation_sites{state="alive"}"#), 1.0);
    assert_eq!(value(r#"vcfed_federation_sites{state="gone"}"#), 0.0);
    assert_eq!(value("vcfed_federation_connected_peers"), 0.0);
    assert_eq!(value("vcfed_federation_outbox_dropped_total"), 0.0);
    assert_eq!(value(r#"vcfed_gossip_dropped_total{reason="forged"}"#), 0.0);
    assert!(value("vcfed_gossip_sent_bytes_total") >= 0.0);
    assert!(value("vcfed_gossip_adverts_applied_total") >= 0.0);
    assert_eq!(value("vcfed_runner_clusters_blocked"), 0.0);
    assert_eq!(value("vcfed_runner_node_retries_total"), 0.0);

    running.stop().await;
}
