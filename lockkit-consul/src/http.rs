//! The Consul agent's HTTP API as lockkit uses it: one pooled hyper client shared by
//! rs-consul (KV acquire/release) and the calls below: sessions (rs-consul has no public
//! session API) and KV reads (rs-consul always sends `recurse=`, and Consul lists a whole
//! prefix whenever that parameter is present, whatever its value).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use lockkit_core::{BoxError, Error, Result};
use rs_consul::types::CreateOrUpdateKeyRequest;
use rs_consul::{Consul, ConsulError, HttpsClient};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::RequestError;

/// Most requests one client has in flight at once, blocking queries aside: Consul refuses
/// connections beyond `limits.http_max_conns_per_client` (200 by default) per client address,
/// and a burst of releases (many guards dropped together) must not reach that.
const MAX_IN_FLIGHT: usize = 48;

/// The HTTP stack of one client: rs-consul for KV, the same pool for sessions.
pub(crate) struct Http {
    consul: Consul,
    client: HttpsClient,
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl Http {
    /// The timeout of one request.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
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

/// What `PUT /v1/session/create` is sent: the session, and no health checks at all.
///
/// By default Consul ties a new session to the agent's `serfHealth` check: when the
/// holder's agent is partitioned away or fails, Consul invalidates the session, and with it
/// the lock goes to the next client at once, while the holder, which cannot hear about it,
/// still believes it holds the lock. A session with no checks ends only when its TTL lapses
/// (the holder gives the lock up at the TTL counted from when it sent the renewal, before
/// Consul can invalidate it) or when it is destroyed. `Checks: []` is how Consul before 1.7
/// says "no checks"; 1.7 and later also take `NodeChecks: []` (and clear the node checks on
/// an empty `Checks` too). `ServiceChecks` is empty unless given.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SessionBody<'a> {
    #[serde(flatten)]
    session: &'a NewSession<'a>,
    checks: [&'static str; 0],
    node_checks: [&'static str; 0],
}

/// One KV entry as `GET /v1/kv/<key>` returns it (the fields lockkit reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KeyEntry {
    /// The entry's key (unescaped).
    pub(crate) key: String,
    /// The Raft index of the entry's last change.
    pub(crate) modify_index: u64,
    /// The Raft index at which the key was created (anew after a deletion).
    #[serde(default)]
    pub(crate) create_index: u64,
    /// How many times the key was taken (kept when its holder writes it again).
    #[serde(default)]
    pub(crate) lock_index: u64,
    /// The session holding the key, if any.
    #[serde(default)]
    pub(crate) session: Option<String>,
    /// The value, base64-encoded (`None` when empty, or left out of a transaction's answer).
    #[serde(default)]
    pub(crate) value: Option<String>,
}

/// One acquisition of a key: the fencing token (the `ModifyIndex` the acquisition wrote) and
/// what tells it apart from every other acquisition of the key for as long as it is held
/// (`CreateIndex` changes when the key is deleted and created again, `LockIndex` with every
/// acquisition of a free key; both stay when the holder writes the key again, so the
/// `ModifyIndex` alone cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acquisition {
    pub(crate) token: u64,
    pub(crate) create_index: u64,
    pub(crate) lock_index: u64,
}

impl KeyEntry {
    /// The acquisition this entry, as its acquisition wrote it, records.
    pub(crate) fn acquisition(&self) -> Acquisition {
        Acquisition {
            token: self.modify_index,
            create_index: self.create_index,
            lock_index: self.lock_index,
        }
    }

    /// Whether `session` holds the key by the acquisition `taken`.
    pub(crate) fn held_by(&self, session: &str, taken: &Acquisition) -> bool {
        self.session.as_deref() == Some(session)
            && self.create_index == taken.create_index
            && self.lock_index == taken.lock_index
    }

    /// The value, decoded (empty when there is none or it is not base64).
    pub(crate) fn value_bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        let encoded = self.value.as_deref().unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_default()
    }
}

/// What a `lock` transaction found.
#[derive(Debug)]
pub(crate) enum Locked {
    /// Taken (the entry as written: its ModifyIndex is the fencing token).
    Taken(Acquisition),
    /// Held by another session (or in its lock-delay).
    Busy,
    /// Consul no longer knows the session.
    InvalidSession,
}

/// The answer of `PUT /v1/txn`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnAnswer {
    #[serde(default)]
    results: Option<Vec<TxnResult>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: KeyEntry,
}

/// Why a `PUT /v1/txn` was refused: which operation failed, and Consul's words.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnError {
    #[serde(default)]
    pub(crate) op_index: usize,
    pub(crate) what: String,
}

/// What a recursive read of the lock prefix is called in errors.
const LISTING: &str = "list lock keys";

/// A KV key as it goes into a URL path: the name encoding's `%` must itself be escaped (the
/// prefix and the encoded name hold nothing else that needs escaping).
pub(crate) fn escaped(key: &str) -> String {
    key.replace('%', "%25")
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
    fn dc(&self) -> &str {
        self.datacenter.as_deref().unwrap_or("")
    }

    /// Runs a short request (not a blocking query) under the in-flight limit and the
    /// request timeout.
    pub(crate) async fn short<T>(
        &self,
        what: &'static str,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let _permit = self.in_flight.acquire().await.expect("never closed");
        self.within(what, self.timeout, request).await
    }

    /// Runs `request`, failing with a connection error if it takes longer than `limit`.
    async fn within<T>(
        &self,
        what: &'static str,
        limit: Duration,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(limit, request)
            .await
            .unwrap_or_else(|_| {
                Err(RequestError::Timeout {
                    what,
                    address: self.address.clone(),
                    timeout: limit,
                }
                .into())
            })
    }

    /// How long a blocking query that waits `wait` may take before it counts as unanswered
    /// (saturating: a wait too long to add to is bounded by the options check anyway).
    fn blocking_limit(&self, wait: Duration) -> Duration {
        wait.saturating_add(wait / 16).saturating_add(self.timeout)
    }

    /// One request of the session helper; `Ok((status, body, X-Consul-Index))`.
    pub(crate) async fn call(
        &self,
        what: &'static str,
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
        let transport = |source: BoxError| RequestError::Transport {
            what,
            address: self.address.clone(),
            source,
        };
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| transport(e.into()))?;
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
            .map_err(|e| transport(e.into()))?
            .to_bytes();
        Ok((status, body, index))
    }

    pub(crate) fn status(&self, what: &'static str, status: StatusCode, body: &[u8]) -> Error {
        RequestError::status(what, &self.address, status, body).into()
    }

    pub(crate) fn answer(&self, what: &'static str, e: serde_json::Error) -> Error {
        RequestError::Answer {
            what,
            address: self.address.clone(),
            source: e.into(),
        }
        .into()
    }

    fn client_error(&self, what: &'static str, e: ConsulError) -> Error {
        RequestError::from_client(what, &self.address, e).into()
    }

    /// `PUT /v1/session/create`: the new session's ID.
    pub(crate) async fn create_session(&self, session: &NewSession<'_>) -> Result<String> {
        const WHAT: &str = "session create";
        let body = SessionBody {
            session,
            checks: [],
            node_checks: [],
        };
        let body = serde_json::to_vec(&body).expect("plain struct");
        let (status, body, _) = self
            .short(
                WHAT,
                self.call(WHAT, Method::PUT, "/v1/session/create", &[], Some(body)),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(self.status(WHAT, status, &body));
        }
        let created: SessionId = serde_json::from_slice(&body).map_err(|e| self.answer(WHAT, e))?;
        Ok(created.id)
    }

    /// `PUT /v1/session/renew/<id>`: `false` if the session no longer exists.
    pub(crate) async fn renew_session(&self, id: &str) -> Result<bool> {
        self.on_session("session renew", "renew", id, &[StatusCode::NOT_FOUND])
            .await
            .map(|status| status == StatusCode::OK)
    }

    /// `PUT /v1/session/destroy/<id>`; destroying a session that is gone succeeds.
    pub(crate) async fn destroy_session(&self, id: &str) -> Result<()> {
        self.on_session("session destroy", "destroy", id, &[])
            .await
            .map(drop)
    }

    /// `PUT /v1/session/<action>/<id>`: the status, if OK or one of `also`.
    async fn on_session(
        &self,
        what: &'static str,
        action: &str,
        id: &str,
        also: &[StatusCode],
    ) -> Result<StatusCode> {
        let path = format!("/v1/session/{action}/{id}");
        let call = self.call(what, Method::PUT, &path, &[], None);
        // A renewal does not queue behind a burst of acquisitions (at most one a second
        // per shared session): a late one loses every lock on the session.
        let (status, body, _) = match action {
            "renew" => self.within(what, self.timeout, call).await?,
            _ => self.short(what, call).await?,
        };
        if status == StatusCode::OK || also.contains(&status) {
            return Ok(status);
        }
        Err(self.status(what, status, &body))
    }

    /// `GET /v1/session/list`, blocking until the sessions change after `index` (or `wait`
    /// passes): the IDs of all sessions and the new index.
    pub(crate) async fn list_sessions(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<String>, u64)> {
        const WHAT: &str = "session list";
        let query = [("index", index.to_string()), ("wait", go_duration(wait))];
        let call = self.call(WHAT, Method::GET, "/v1/session/list", &query, None);
        let (status, body, index) = self.within(WHAT, self.blocking_limit(wait), call).await?;
        if status != StatusCode::OK {
            return Err(self.status(WHAT, status, &body));
        }
        let sessions: Vec<SessionId> =
            serde_json::from_slice(&body).map_err(|e| self.answer(WHAT, e))?;
        Ok((sessions.into_iter().map(|s| s.id).collect(), index))
    }

    /// `GET /v1/status/leader`: fails unless the agent answers and knows a leader.
    pub(crate) async fn ping(&self) -> Result<()> {
        const WHAT: &str = "status";
        let call = self.call(WHAT, Method::GET, "/v1/status/leader", &[], None);
        let (status, body, _) = self.short(WHAT, call).await?;
        if status != StatusCode::OK {
            return Err(self.status(WHAT, status, &body));
        }
        if String::from_utf8_lossy(&body)
            .trim()
            .trim_matches('"')
            .is_empty()
        {
            return Err(RequestError::NoLeader {
                address: self.address.clone(),
            }
            .into());
        }
        Ok(())
    }

    /// Reads exactly the KV key `key` (no `recurse`: Consul would list every key it starts
    /// with), blocking until it changes after `index` (at most `wait`) when given: the entry
    /// if the key exists, and the index to block on next (none if Consul sent none).
    pub(crate) async fn read_key(
        &self,
        key: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(Option<KeyEntry>, Option<u64>)> {
        const WHAT: &str = "read lock key";
        let path = format!("/v1/kv/{}", escaped(key));
        let (status, body, next) = match index {
            None => {
                let call = self.call(WHAT, Method::GET, &path, &[], None);
                self.short(WHAT, call).await?
            }
            Some(index) => {
                let query = [("index", index.to_string()), ("wait", go_duration(wait))];
                let call = self.call(WHAT, Method::GET, &path, &query, None);
                self.within(WHAT, self.blocking_limit(wait), call).await?
            }
        };
        match status {
            // Consul indexes a missing key too: a blocking read then waits for its creation.
            StatusCode::NOT_FOUND => Ok((None, (next > 0).then_some(next))),
            StatusCode::OK => {
                let entries: Vec<KeyEntry> =
                    serde_json::from_slice(&body).map_err(|e| self.answer(WHAT, e))?;
                // Only this key, even if an agent ever answered with a listing.
                let entry = entries.into_iter().find(|e| e.key == key);
                Ok((entry, Some(next)))
            }
            _ => Err(self.status(WHAT, status, &body)),
        }
    }

    /// Runs the KV operations `ops` in one `PUT /v1/txn`: the entries the operations
    /// answered with, in order, or why Consul refused the whole transaction.
    pub(crate) async fn transact(
        &self,
        what: &'static str,
        ops: &serde_json::Value,
    ) -> Result<std::result::Result<Vec<KeyEntry>, Vec<TxnError>>> {
        let body = serde_json::to_vec(ops).expect("plain JSON");
        let call = self.call(what, Method::PUT, "/v1/txn", &[], Some(body));
        let (status, body, _) = self.short(what, call).await?;
        let answer = |body: &[u8]| -> Result<TxnAnswer> {
            serde_json::from_slice(body).map_err(|e| self.answer(what, e))
        };
        match status {
            StatusCode::OK => {
                let results = answer(&body)?.results.into_iter().flatten();
                Ok(Ok(results.map(|r| r.kv).collect()))
            }
            StatusCode::CONFLICT => Ok(Err(answer(&body)?.errors.unwrap_or_default())),
            _ => Err(self.status(what, status, &body)),
        }
    }

    /// Runs the KV operations `ops` in one `PUT /v1/txn` whose last one writes the key as
    /// `session`: the entry as written if the session holds it, else whether Consul said
    /// the session is invalid.
    async fn txn(
        &self,
        what: &'static str,
        ops: serde_json::Value,
        session: &str,
    ) -> Result<std::result::Result<KeyEntry, bool>> {
        Ok(match self.transact(what, &ops).await? {
            Ok(entries) => match entries.into_iter().next_back() {
                Some(entry) if entry.session.as_deref() == Some(session) => Ok(entry),
                _ => Err(false),
            },
            Err(errors) => Err(errors.iter().any(|e| e.what.contains("invalid session"))),
        })
    }

    /// Takes the KV key `key` for `session` in one `PUT /v1/txn` (the `lock` verb), which
    /// answers with the entry as written: its ModifyIndex is the fencing token, so no read
    /// follows.
    pub(crate) async fn lock_key(&self, key: &str, session: &str) -> Result<Locked> {
        let ops = serde_json::json!([{
            "KV": {"Verb": "lock", "Key": key, "Value": "", "Session": session}
        }]);
        Ok(match self.txn("acquire (txn)", ops, session).await? {
            Ok(entry) => Locked::Taken(entry.acquisition()),
            Err(true) => Locked::InvalidSession,
            Err(false) => Locked::Busy,
        })
    }

    /// Writes `value` to the KV key `key` held by `session`, in one `PUT /v1/txn`: a
    /// `check-index` on `index` (the key's last `ModifyIndex` the caller knows of) and the
    /// `lock` verb, which keeps the key held by the session (and its `LockIndex`). The new
    /// `ModifyIndex`, or `None` if the key changed since `index` (or the session no longer
    /// holds it): the caller reads it to tell which.
    pub(crate) async fn write_held(
        &self,
        key: &str,
        session: &str,
        index: u64,
        value: &[u8],
    ) -> Result<Option<u64>> {
        use base64::Engine as _;
        let value = base64::engine::general_purpose::STANDARD.encode(value);
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-index", "Key": key, "Index": index}},
            {"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": session}}
        ]);
        let written = self.txn("store a value (txn)", ops, session).await?;
        Ok(written.ok().map(|entry| entry.modify_index))
    }

    /// Every KV entry under `prefix/` (one recursive read, with the holders' values:
    /// at most 4 KiB each).
    pub(crate) async fn list_keys(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        match self.listing(prefix).await? {
            None => Ok(Vec::new()),
            Some(body) => serde_json::from_slice(&body).map_err(|e| self.answer(LISTING, e)),
        }
    }

    /// The answer to one recursive read of `prefix/`; `None` when nothing is under it.
    async fn listing(&self, prefix: &str) -> Result<Option<Bytes>> {
        let path = format!("/v1/kv/{}/", escaped(prefix));
        let query = [("recurse", "true".to_string())];
        let call = self.call(LISTING, Method::GET, &path, &query, None);
        let (status, body, _) = self.short(LISTING, call).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => Ok(Some(body)),
            _ => Err(self.status(LISTING, status, &body)),
        }
    }

    /// The keys under `prefix/` that `session` holds (one recursive read, like
    /// [`Http::list_keys`]). Each entry is read in place from the answer and only the keys
    /// held by `session` are kept, so checking a session with thousands of keys does not
    /// build an entry, with its session id and value, for every key under the prefix.
    pub(crate) async fn keys_held_by(
        &self,
        prefix: &str,
        session: &str,
    ) -> Result<HashSet<String>> {
        /// The two fields read, borrowed from the answer where no escape needs decoding.
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Held<'a> {
            #[serde(borrow)]
            key: Cow<'a, str>,
            #[serde(default, borrow)]
            session: Option<Cow<'a, str>>,
        }
        let Some(body) = self.listing(prefix).await? else {
            return Ok(HashSet::new());
        };
        let entries: Vec<Held<'_>> =
            serde_json::from_slice(&body).map_err(|e| self.answer(LISTING, e))?;
        Ok(entries
            .into_iter()
            .filter(|e| e.session.as_deref() == Some(session))
            .map(|e| e.key.into_owned())
            .collect())
    }

    /// `PUT ?acquire=<session>` (or `?release=<session>`) on the KV key `key`: whether
    /// Consul did it.
    pub(crate) async fn put_key(&self, key: &str, acquire: &str, release: &str) -> Result<bool> {
        let what = if acquire.is_empty() {
            "release"
        } else {
            "acquire"
        };
        let path = escaped(key);
        let request = CreateOrUpdateKeyRequest::builder()
            .key(&path)
            .datacenter(self.dc())
            .acquire(acquire)
            .release(release)
            .build();
        let put = async { Ok(self.consul.create_or_update_key(request, Vec::new()).await) };
        match self.short(what, put).await? {
            Ok((done, _)) => Ok(done),
            Err(e) => Err(self.client_error(what, e)),
        }
    }
}
