//! The Lua scripts, loaded once per connection (EVALSHA, with a fallback on NOSCRIPT).

use std::sync::LazyLock;

use redis::Script;

/// KEYS: lock, fence. ARGV: owner, ttl ms. `{1, token}` when taken, `{0, pttl}` when held.
///
/// The token is `max(fence + 1, server time in µs)`, stored back in the fence key: a hybrid
/// logical clock. While the fence key lives, tokens rise by the counter; when it is lost
/// (a restart without persistence, a failover to a replica that missed it, eviction, a
/// FLUSHALL), the server's clock carries on above every token it issued before, as long as
/// that clock did not step back past them. The clock is assembled as a string and compared
/// as a number below 2^53 (µs until the year 2255), so Lua's doubles keep it exact; a fence
/// at or above it is `INCR`ed by Redis itself, exactly.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.replicate_commands then redis.replicate_commands() end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local time = redis.call('TIME')
    local clock = time[1] .. string.format('%06d', tonumber(time[2]))
    local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
    if fence and fence >= tonumber(clock) then
        return {1, redis.call('INCR', KEYS[2])}
    end
    redis.call('SET', KEYS[2], clock)
    return {1, tonumber(clock)}
end
return {0, redis.call('PTTL', KEYS[1])}
",
    )
});

/// KEYS: lock, fence. ARGV: owner. The fence counter if the lock is ours (an acquisition
/// whose answer was lost went through), else -1.
pub(crate) static RECOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return -1
",
    )
});

/// KEYS: lock. ARGV: owner, ttl ms. 1 if extended, 0 if not ours.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// KEYS: lock. ARGV: owner, channel, publish (`1` tells the waiters, `0` undoes a partial
/// RedLock acquisition quietly). 1 if released, 0 if not ours.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[3] == '1' then
        redis.call('PUBLISH', ARGV[2], 'released')
    end
    return 1
end
return 0
",
    )
});

/// KEYS: fence. ARGV: token. Raises the counter to at least the token.
pub(crate) static WRITE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end
return 1
",
    )
});
