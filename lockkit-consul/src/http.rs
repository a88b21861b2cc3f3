//! The HTTP side: one pooled hyper client shared by rs-consul (KV) and the session helper
//! below (rs-consul has no public session API), plus error mapping.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use lockkit_core::{Error, Result};
use rs_consul::{Consul, ConsulError, HttpsClient};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

pub(crate) const BACKEND: &str = "consul";

/// Most requests one client has in flight at once, blocking queries aside: Consul refuses
/// connections beyond `limits.http_max_conns_per_client` (200 by default) per client address,
/// and a burst of releases (many guards dropped together) must not reach that.
const MAX_IN_FLIGHT: usize = 48;

/// The HTTP stack of one client: rs-consul for KV, the same pool for sessions.
pub(crate) struct Http {
    pub(crate) consul: Consul,
    client: HttpsClient,
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .finish_non_exhaustive()
    }
}

/// The body of `PUT /v1/session/create`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NewSession<'a> {
    pub(crate) name: &'a str,
    #[serde(rename = "TTL")]
    pub(crate) ttl: String,
    pub(crate) behavior: &'a str,
    pub(crate) lock_delay: String,
}

#[derive(Deserialize)]
struct SessionId {
    #[serde(rename = "ID")]
    id: String,
}

/// A Go duration string Consul accepts, rounded up to whole milliseconds.
pub(crate) fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_nanos().div_ceil(1_000_000))
}

impl Http {
    pub(crate) fn new(
        address: String,
        token: Option<String>,
        datacenter: Option<String>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Http> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        // An explicit provider: the process-wide default is ambiguous when another crate
        // enables a second rustls backend.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::Unsupported(format!("TLS setup: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let mut builder =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(MAX_IN_FLIGHT);
        let client: HttpsClient = builder.build(https);
        let config = rs_consul::Config {
            address: address.clone(),
            token: token.clone(),
            hyper_builder: builder,
        };
        Ok(Http {
            consul: Consul::new_with_client(config, client.clone()),
            client,
            address,
            token,
            datacenter,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// The datacenter parameter for rs-consul requests (`""`: the agent's).
    pub(crate) fn dc(&self) -> &str {
        self.datacenter.as_deref().unwrap_or("")
    }

    /// The timeout of one non-blocking request.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a short request (not a blocking query) under the in-flight limit and the
    /// request timeout.
    pub(crate) async fn short<T>(
        &self,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let _permit = self.in_flight.acquire().await.expect("never closed");
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(Error::connection(
                BACKEND,
                format!("{}: no answer within {:?}", self.address, self.timeout),
            )),
        }
    }

    /// One request of the session helper; `Ok((status, body, X-Consul-Index))`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes, u64)> {
        let mut uri = format!("{}{path}", self.address);
        let mut params: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(dc) = &self.datacenter {
            params.push(format!("dc={dc}"));
        }
        if !params.is_empty() {
            uri.push('?');
            uri.push_str(&params.join("&"));
        }
        let mut request = hyper::Request::builder().method(method).uri(uri);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default()))
            .map_err(|never| match never {})
            .boxed();
        let request = request
            .body(body)
            .map_err(|e| Error::InvalidOptions(format!("bad Consul request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::connection(BACKEND, format!("{}: {e}", self.address)))?
            .to_bytes();
        Ok((status, body, index))
    }

    fn transport(&self, e: hyper_util::client::legacy::Error) -> Error {
        // Every transport failure (refused, reset, closed mid-answer) is retryable.
        Error::connection(BACKEND, format!("{}: {}", self.address, describe(&e)))
    }

    fn unexpected(&self, what: &str, status: StatusCode, body: &[u8]) -> Error {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
        Error::backend(
            BACKEND,
            format!(
                "{what}: {} answered {status}: {}",
                self.address,
                text.trim()
            ),
        )
    }

    /// `PUT /v1/session/create`: the new session's ID.
    pub(crate) async fn create_session(&self, session: &NewSession<'_>) -> Result<String> {
        let body = serde_json::to_vec(session).expect("plain struct");
        let (status, body, _) = self
            .short(self.call(Method::PUT, "/v1/session/create", &[], Some(body)))
            .await?;
        if status != StatusCode::OK {
            return Err(self.unexpected("session create", status, &body));
        }
        let created: SessionId = serde_json::from_slice(&body)
            .map_err(|e| Error::backend(BACKEND, format!("session create answer: {e}")))?;
        Ok(created.id)
    }

    /// `PUT /v1/session/renew/<id>`: `false` if the session no longer exists.
    pub(crate) async fn renew_session(&self, id: &str) -> Result<bool> {
        let path = format!("/v1/session/renew/{id}");
        let (status, body, _) = self.short(self.call(Method::PUT, &path, &[], None)).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.unexpected("session renew", status, &body)),
        }
    }

    /// `PUT /v1/session/destroy/<id>`; destroying a session that is gone succeeds.
    pub(crate) async fn destroy_session(&self, id: &str) -> Result<()> {
        let path = format!("/v1/session/destroy/{id}");
        let (status, body, _) = self.short(self.call(Method::PUT, &path, &[], None)).await?;
        match status {
            StatusCode::OK => Ok(()),
            _ => Err(self.unexpected("session destroy", status, &body)),
        }
    }

    /// `GET /v1/session/list`, blocking until the sessions change after `index` (or `wait`
    /// passes): the IDs of all sessions and the new index.
    pub(crate) async fn list_sessions(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<String>, u64)> {
        let query = [("index", index.to_string()), ("wait", go_duration(wait))];
        let call = self.call(Method::GET, "/v1/session/list", &query, None);
        let limit = wait + wait / 16 + self.timeout;
        let (status, body, index) = tokio::time::timeout(limit, call)
            .await
            .map_err(|_| Error::connection(BACKEND, "no answer to a blocking query"))??;
        if status != StatusCode::OK {
            return Err(self.unexpected("session list", status, &body));
        }
        let sessions: Vec<SessionId> = serde_json::from_slice(&body)
            .map_err(|e| Error::backend(BACKEND, format!("session list answer: {e}")))?;
        Ok((sessions.into_iter().map(|s| s.id).collect(), index))
    }

    /// `GET /v1/status/leader`: fails unless the agent answers and knows a leader.
    pub(crate) async fn ping(&self) -> Result<()> {
        let (status, body, _) = self
            .short(self.call(Method::GET, "/v1/status/leader", &[], None))
            .await?;
        let leader = String::from_utf8_lossy(&body);
        if status != StatusCode::OK {
            return Err(self.unexpected("status", status, &body));
        }
        if leader.trim().trim_matches('"').is_empty() {
            return Err(Error::connection(
                BACKEND,
                format!("{}: the agent knows no cluster leader", self.address),
            ));
        }
        Ok(())
    }

    /// Maps an rs-consul error: transport failures and timeouts are connection errors.
    pub(crate) fn map(&self, what: &str, e: ConsulError) -> Error {
        match e {
            ConsulError::ResponseError(e) => self.transport(e),
            ConsulError::InvalidResponse(e) => {
                Error::connection(BACKEND, format!("{what}: {}: {e}", self.address))
            }
            ConsulError::TimeoutExceeded(d) => Error::connection(
                BACKEND,
                format!("{what}: {}: no answer within {d:?}", self.address),
            ),
            ConsulError::UnexpectedResponseCode(status, body) => {
                self.unexpected(what, status, body.unwrap_or_default().as_bytes())
            }
            other => Error::backend(BACKEND, format!("{what}: {}: {other}", self.address)),
        }
    }
}

/// The error and its causes on one line (hyper-util's own message is only "client error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
