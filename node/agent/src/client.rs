//! A small client of the agent's local HTTP API, used by the CLI, the demo
//! and the tests.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api_types::ErrorBody;

/// How long one API call may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read, bytes.
const RESPONSE_LEN_MAX: usize = 16 * 1024 * 1024;
/// Most times one call is sent again after `503` `busy`.
const BUSY_RETRIES_MAX: u32 = 5;
/// Most time one call waits in all before sending again after `busy`: a
/// command fails rather than hang on an agent that stays overloaded.
const BUSY_WAIT_MAX: Duration = Duration::from_secs(10);
/// Wait after `busy` when the answer has no `Retry-After` in seconds.
const BUSY_WAIT_DEFAULT: Duration = Duration::from_secs(1);

/// What [`segment`] escapes: everything but RFC 3986's unreserved characters.
const SEGMENT_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as one path segment of an API URL, percent-encoded: a reservation
/// key such as `c-1f/1` stays one segment, and the server's `Path` extractor
/// decodes it back. Callers refuse empty names first: an empty segment
/// names no resource.
pub fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT_ESCAPED).to_string()
}

/// Why a request found no agent, in the OS's words ("connection refused"):
/// the io::Error deepest in the chain, without the client library's layers
/// ("client error (Connect)", "tcp connect error") around it.
fn unreachable_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(error);
    let mut io = None;
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            io = Some(e);
        }
        cause = e.source();
    }
    match io {
        Some(io) => io.kind().to_string(),
        None => error.to_string(),
    }
}

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error(
        "cannot reach the vcfed agent at {addr}: {detail} (is it running? `vcfed run --config FILE` starts it)"
    )]
    Unreachable {
        /// API address.
        addr: SocketAddr,
        /// What failed.
        detail: String,
    },
    /// The agent did not answer in time.
    #[error("the vcfed agent at {addr} did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// API address.
        addr: SocketAddr,
    },
    /// The agent answered with an error.
    #[error("{message} ({status}, {code})")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error's code.
        code: String,
        /// The error's message.
        message: String,
        /// For capacity errors: nodes available.
        available: Option<u32>,
    },
    /// The answer did not decode.
    #[error("unexpected answer from the agent ({status}): {detail}")]
    BadResponse {
        /// HTTP status.
        status: StatusCode,
        /// What is wrong.
        detail: String,
    },
}

/// A client bound to one agent's API address and token.
#[derive(Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for the agent at `addr` using `token`.
    pub fn new(addr: SocketAddr, token: String) -> ApiClient {
        let http = Client::builder(TokioExecutor::new()).build_http();
        ApiClient { addr, token, http }
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`, decoding the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON body, decoding the JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// One call: sends, waits at most [`REQUEST_TIMEOUT`] for each answer,
    /// maps errors.
    ///
    /// An answer `503` `busy` is followed: the call is sent again after its
    /// `Retry-After`, at most [`BUSY_RETRIES_MAX`] times and
    /// [`BUSY_WAIT_MAX`] of waiting in all. That is safe for any method,
    /// `POST` included: the agent answers `busy` only before a handler sees
    /// the request (over `api.connections_max`, before reading it; over
    /// `api.requests_max`, before handing it on), so a request answered
    /// `busy` was not handled.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let payload = body.map(json_payload);
        let mut retries = 0;
        let mut waited = Duration::ZERO;
        let (status, bytes) = loop {
            let answer = self.send(method.clone(), path, payload.clone()).await?;
            if answer.status.is_success() {
                break (answer.status, answer.body);
            }
            let error = match serde_json::from_slice::<ErrorBody>(&answer.body) {
                Ok(ErrorBody { error }) => error,
                Err(_) => {
                    return Err(ClientError::BadResponse {
                        status: answer.status,
                        detail: String::from_utf8_lossy(&answer.body).into_owned(),
                    });
                }
            };
            let retry = (answer.status == StatusCode::SERVICE_UNAVAILABLE && error.code == "busy")
                .then(|| busy_wait(answer.retry_after.as_deref(), retries, waited))
                .flatten();
            let Some(wait) = retry else {
                return Err(ClientError::Api {
                    status: answer.status,
                    code: error.code,
                    message: error.message,
                    available: error.available,
                });
            };
            tracing::debug!(
                path,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                retries,
                "the agent is busy; sending the call again"
            );
            tokio::time::sleep(wait).await;
            retries += 1;
            waited += wait;
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
            status,
            detail: e.to_string(),
        })
    }

    /// One call returning the status and the raw body, without mapping
    /// error statuses nor retrying `busy` (for tests of the API itself).
    pub async fn raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let answer = self.send(method, path, body.map(json_payload)).await?;
        Ok((answer.status, answer.body))
    }

    /// Sends one request with `payload` as its JSON body, and reads the
    /// answer within [`REQUEST_TIMEOUT`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        payload: Option<Bytes>,
    ) -> Result<Answer, ClientError> {
        let uri = format!("http://{}{}", self.addr, path);
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if payload.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(payload.unwrap_or_default()))
            .map_err(|e| ClientError::Unreachable {
                addr: self.addr,
                detail: e.to_string(),
            })?;
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        addr: self.addr,
                        detail: unreachable_reason(&e),
                    })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = http_body_util::Limited::new(response.into_body(), RESPONSE_LEN_MAX)
                .collect()
                .await
                .map_err(|e| ClientError::BadResponse {
                    status,
                    detail: e.to_string(),
                })?
                .to_bytes();
            Ok(Answer {
                status,
                retry_after,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout { addr: self.addr })?
    }
}

/// An answer of the agent.
struct Answer {
    status: StatusCode,
    /// The `Retry-After` header, if any.
    retry_after: Option<String>,
    body: Bytes,
}

/// `body` as JSON bytes.
fn json_payload<B: Serialize>(body: &B) -> Bytes {
    Bytes::from(serde_json::to_vec(body).expect("request bodies are plain serde structs"))
}

/// How long to wait before sending again a call answered `busy` with
/// `retry_after` (the header's value), after `retries` retries that waited
/// `waited` in all; `None` once the bounds are reached.
fn busy_wait(retry_after: Option<&str>, retries: u32, waited: Duration) -> Option<Duration> {
    if retries >= BUSY_RETRIES_MAX {
        return None;
    }
    // The agent sends seconds; an HTTP date or garbage gets the default.
    let wait = retry_after
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(BUSY_WAIT_DEFAULT, Duration::from_secs);
    (waited + wait <= BUSY_WAIT_MAX).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_retried_after_its_retry_after_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(busy_wait(Some("1"), 0, Duration::ZERO), Some(s(1)));
        assert_eq!(busy_wait(Some(" 3 "), 2, s(2)), Some(s(3)));
        assert_eq!(busy_wait(None, 0, Duration::ZERO), Some(BUSY_WAIT_DEFAULT));
        assert_eq!(
            busy_wait(Some("Wed, 21 Oct 2015 07:28:00 GMT"), 0, Duration::ZERO),
            Some(BUSY_WAIT_DEFAULT)
        );
        // At most BUSY_RETRIES_MAX retries.
        assert_eq!(busy_wait(Some("0"), BUSY_RETRIES_MAX - 1, s(0)), Some(s(0)));
        assert_eq!(busy_wait(Some("0"), BUSY_RETRIES_MAX, s(0)), None);
        // At most BUSY_WAIT_MAX of waiting in all: a long Retry-After is
        // not waited for.
        assert_eq!(busy_wait(Some("1"), 1, BUSY_WAIT_MAX - s(1)), Some(s(1)));
        assert_eq!(busy_wait(Some("1"), 1, BUSY_WAIT_MAX), None);
        assert_eq!(busy_wait(Some("3600"), 0, Duration::ZERO), None);
    }

    /// A fake agent on loopback answering each request in turn with one of
    /// `answers` (status, code) and `Retry-After: 0`, then 200 `{}`; returns
    /// its address and the number of requests it got.
    fn fake_agent(
        runtime: &tokio::runtime::Runtime,
        answers: Vec<(u16, &'static str)>,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        runtime.spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                // One request a connection: headers and a small body arrive
                // in one read on loopback.
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await.unwrap();
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let (status, body) = match answers.get(n) {
                    Some((status, code)) => (
                        *status,
                        format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"m\"}}}}"),
                    ),
                    None => (200, "{}".to_owned()),
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nretry-after: 0\r\n\
                     connection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
                // Closes only once the client has: what it sent and we did
                // not read would otherwise reset the connection.
                stream.shutdown().await.unwrap();
                let _ = stream.read_to_end(&mut Vec::new()).await;
            }
        });
        (addr, requests)
    }

    #[test]
    fn a_call_answered_busy_is_sent_again_and_succeeds() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (addr, requests) = fake_agent(&runtime, vec![(503, "busy"), (503, "busy")]);
        let client = ApiClient::new(addr, "token".to_owned());
        let answer: serde_json::Value = runtime
            .block_on(client.post("/v1/clusters", &serde_json::json!({"name": "c"})))
            .unwrap();
        assert_eq!(answer, serde_json::json!({}));
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn an_agent_that_stays_busy_fails_the_call_after_the_retries() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let busy = vec![(503, "busy"); usize::try_from(BUSY_RETRIES_MAX).unwrap() + 1];
        let (addr, requests) = fake_agent(&runtime, busy);
        let client = ApiClient::new(addr, "token".to_owned());
        let e = runtime
            .block_on(client.get::<serde_json::Value>("/v1/site"))
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Api { code, .. } if code == "busy"),
            "{e}"
        );
        assert_eq!(
            requests.load(std::sync::atomic::Ordering::SeqCst),
            usize::try_from(BUSY_RETRIES_MAX).unwrap() + 1
        );
    }

    #[test]
    fn other_errors_are_not_sent_again() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (addr, requests) = fake_agent(&runtime, vec![(503, "unavailable")]);
        let client = ApiClient::new(addr, "token".to_owned());
        let e = runtime
            .block_on(client.get::<serde_json::Value>("/v1/sites"))
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Api { code, .. } if code == "unavailable"),
            "{e}"
        );
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn an_agent_that_is_not_running_is_named_once_in_plain_words() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = ApiClient::new(addr, "token".to_owned());
        let err = runtime
            .block_on(client.get::<serde_json::Value>("/v1/site"))
            .unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            text,
            format!(
                "cannot reach the vcfed agent at {addr}: connection refused (is it running? \
                 `vcfed run --config FILE` starts it)"
            )
        );
    }
}
