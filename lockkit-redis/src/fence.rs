//! Fencing a resource kept in Redis: one Lua script checks the fencing token against the
//! highest seen for the resource and, in the same atomic step, applies the operation.
//!
//! A lease lock alone does not give exclusion: a holder paused past its lease wakes up
//! still acting on the lock. The resource must reject it by its [`FencingToken`]: run every
//! operation under the lock, reads included, through [`RedisFence`] with the guard's token.
//! The highest token seen for a resource lives in its own key (`lockkit:fence:<resource>`
//! unless another prefix is given); a lower token is [`FenceError::Stale`] and the operation
//! is not run. The script runs on any Redis connection of the [`redis`] crate (the
//! version lockkit uses is re-exported as `lockkit_redis::redis`), not only lockkit's.
//!
//! Tokens are compared exactly, as decimal strings, never as Lua numbers (doubles, exact
//! only up to 2^53): the whole `u64` range works.

use lockkit_core::FencingToken;
use redis::aio::ConnectionLike;
use redis::{FromRedisValue, RedisError, Script, ToRedisArgs, Value};
use std::sync::LazyLock;

/// The fence keys' prefix unless another is given: `lockkit:fence:`.
pub const DEFAULT_FENCE_PREFIX: &str = "lockkit:fence:";

/// KEYS: fence, data (unless CHECK). ARGV: token (canonical decimal), operation, its value.
/// `{0, highest}` if the token is lower than the highest seen, else the operation's result
/// as `{1, result}`, and the token recorded if it is higher.
///
/// The comparison is exact for any decimal numbers: by length (after leading zeros), then
/// digit by digit; Lua's numbers (doubles) and `<` on strings (the server's collation) are
/// not used.
static FENCED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local token = ARGV[1]
local seen = redis.call('GET', KEYS[1])
if seen then
    seen = string.match(seen, '^0*(%d+)$')
    if not seen then
        return redis.error_reply('lockkit fence: ' .. KEYS[1] .. ' holds no token')
    end
    if #seen ~= #token then
        if #seen > #token then return {0, seen} end
    else
        for i = 1, #seen do
            local a, b = string.byte(seen, i), string.byte(token, i)
            if a > b then return {0, seen} end
            if a < b then break end
        end
    end
end
local op, result = ARGV[2], false
if op == 'GET' then
    result = redis.call('GET', KEYS[2])
elseif op == 'SET' then
    redis.call('SET', KEYS[2], ARGV[3])
elseif op == 'INCRBY' or op == 'DECRBY' then
    result = redis.call(op, KEYS[2], ARGV[3])
elseif op ~= 'CHECK' then
    return redis.error_reply('lockkit fence: unknown operation ' .. op)
end
if seen ~= token then redis.call('SET', KEYS[1], token) end
return {1, result}
",
    )
});

/// Why a fence refused an operation, or could not run it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// A newer holder's token was already seen for `resource`: the presented token is
    /// stale, the holder lost the lock, and the operation was not run.
    #[error(
        "stale fencing token {presented} for `{resource}`: token {highest} was already seen \
         (the lock was lost)"
    )]
    Stale {
        /// The fenced resource.
        resource: String,
        /// The token that was presented.
        presented: u64,
        /// The highest token seen for the resource.
        highest: u64,
    },
    /// The resource name is empty.
    #[error("fenced resource `{resource}`: {reason}")]
    InvalidResource {
        /// The resource name.
        resource: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Redis failed the script (unreachable, a data key of the wrong type, a fence key
    /// holding something other than a token, ...). Whether the operation ran is unknown when
    /// the connection failed: retry it with the same token only if it is idempotent (`GET`,
    /// `SET`).
    #[error("fenced operation failed: {0}")]
    Redis(#[from] RedisError),
}

impl FenceError {
    /// Whether the token was stale: a newer holder got there first.
    pub fn is_stale(&self) -> bool {
        matches!(self, FenceError::Stale { .. })
    }

    /// Whether the connection failed (the operation may or may not have run).
    pub fn is_connection(&self) -> bool {
        matches!(self, FenceError::Redis(e) if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal())
    }
}

/// Fenced operations on Redis: each checks the token for a resource and runs in one script
/// with the check.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lockkit_core::FencingToken;
/// use lockkit_redis::fence::{FenceError, RedisFence};
/// use lockkit_redis::redis;
///
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let mut conn = client.get_multiplexed_async_connection().await?;
/// let fence = RedisFence::new();
/// let token = FencingToken(8); // guard.fencing_token() under the lock
///
/// fence.set(&mut conn, "stock/sku-42", token, "stock:sku-42", 10).await?;
/// let units: Option<i64> = fence.get(&mut conn, "stock/sku-42", token, "stock:sku-42").await?;
/// assert_eq!(units, Some(10));
/// assert_eq!(fence.decr_by(&mut conn, "stock/sku-42", token, "stock:sku-42", 1).await?, 9);
///
/// // A holder paused past its lease, with an older token: nothing runs.
/// let stale = fence.decr_by(&mut conn, "stock/sku-42", FencingToken(7), "stock:sku-42", 1);
/// assert!(matches!(stale.await, Err(FenceError::Stale { presented: 7, highest: 8, .. })));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisFence {
    prefix: String,
}

impl Default for RedisFence {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisFence {
    /// Fence keys named [`DEFAULT_FENCE_PREFIX`] followed by the resource.
    pub fn new() -> Self {
        Self::with_prefix(DEFAULT_FENCE_PREFIX)
    }

    /// Fence keys named `prefix` followed by the resource. The fence keys must not expire
    /// nor be evicted (lockkit already asks for `maxmemory-policy noeviction`): a lost fence
    /// key forgets the highest token.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        RedisFence {
            prefix: prefix.into(),
        }
    }

    /// The key that keeps the highest token seen for `resource`.
    pub fn fence_key(&self, resource: &str) -> String {
        format!("{}{resource}", self.prefix)
    }

    /// Presents `token` for `resource` and records it if it is the highest yet; no other
    /// operation. [`FenceError::Stale`] if a higher token was already seen.
    pub async fn check<C>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
    ) -> Result<(), FenceError>
    where
        C: ConnectionLike + Send,
    {
        self.run(conn, resource, token, None, "CHECK")
            .await
            .map(drop)
    }

    /// `GET key`, fenced: the value (`None` if the key is absent), read only if `token` is
    /// at least the highest seen for `resource`.
    pub async fn get<C, V>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: &str,
    ) -> Result<Option<V>, FenceError>
    where
        C: ConnectionLike + Send,
        V: FromRedisValue,
    {
        let value = self.run(conn, resource, token, Some(key), "GET").await?;
        match value {
            Value::Nil => Ok(None),
            value => Ok(Some(V::from_redis_value(value).map_err(RedisError::from)?)),
        }
    }

    /// `SET key value`, fenced. `value` must be one argument (a string, bytes, a number).
    pub async fn set<C, V>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: &str,
        value: V,
    ) -> Result<(), FenceError>
    where
        C: ConnectionLike + Send,
        V: ToRedisArgs,
    {
        self.run(conn, resource, token, Some(key), ("SET", value))
            .await
            .map(drop)
    }

    /// `INCRBY key delta`, fenced: the new value.
    pub async fn incr_by<C>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: &str,
        delta: i64,
    ) -> Result<i64, FenceError>
    where
        C: ConnectionLike + Send,
    {
        self.counter(conn, resource, token, key, ("INCRBY", delta))
            .await
    }

    /// `DECRBY key delta`, fenced: the new value.
    pub async fn decr_by<C>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: &str,
        delta: i64,
    ) -> Result<i64, FenceError>
    where
        C: ConnectionLike + Send,
    {
        self.counter(conn, resource, token, key, ("DECRBY", delta))
            .await
    }

    /// `INCRBY` or `DECRBY`, fenced: the new value.
    async fn counter<C>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: &str,
        operation: (&str, i64),
    ) -> Result<i64, FenceError>
    where
        C: ConnectionLike + Send,
    {
        let value = self
            .run(conn, resource, token, Some(key), operation)
            .await?;
        Ok(i64::from_redis_value(value).map_err(RedisError::from)?)
    }

    /// Runs the script: the operation's result, or [`FenceError::Stale`].
    async fn run<C, A>(
        &self,
        conn: &mut C,
        resource: &str,
        token: FencingToken,
        key: Option<&str>,
        operation: A,
    ) -> Result<Value, FenceError>
    where
        C: ConnectionLike + Send,
        A: ToRedisArgs,
    {
        if resource.is_empty() {
            return Err(FenceError::InvalidResource {
                resource: String::new(),
                reason: "empty",
            });
        }
        let mut call = FENCED.prepare_invoke();
        call.key(self.fence_key(resource));
        if let Some(key) = key {
            call.key(key);
        }
        call.arg(token.get().to_string()).arg(operation);
        let (accepted, value): (i64, Value) = call.invoke_async(conn).await?;
        if accepted == 1 {
            return Ok(value);
        }
        let highest = u64::from_redis_value(value).map_err(RedisError::from)?;
        Err(FenceError::Stale {
            resource: resource.to_string(),
            presented: token.get(),
            highest,
        })
    }
}
