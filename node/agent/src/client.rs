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

    /// One call: sends, waits at most [`REQUEST_TIMEOUT`], maps errors.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(ErrorBody { error }) => ClientError::Api {
                    status,
                    code: error.code,
                    message: error.message,
                    available: error.available,
                },
                Err(_) => ClientError::BadResponse {
                    status,
                    detail: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
            status,
            detail: e.to_string(),
        })
    }

    /// One call returning the status and the raw body, without mapping
    /// error statuses (for tests of the API itself).
    pub async fn raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let uri = format!("http://{}{}", self.addr, path);
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        let payload = match body {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(
                    serde_json::to_vec(body).expect("request bodies are plain serde structs"),
                )
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(payload))
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
            let body = http_body_util::Limited::new(response.into_body(), RESPONSE_LEN_MAX)
                .collect()
                .await
                .map_err(|e| ClientError::BadResponse {
                    status,
                    detail: e.to_string(),
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout { addr: self.addr })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
