//! The Lua scripts, loaded once per connection (EVALSHA, with a fallback on NOSCRIPT).

use std::sync::LazyLock;

use redis::Script;

/// KEYS: lock, fence, queue, alive. ARGV: owner, ttl ms, mode, liveness ms, channel,
/// proposed token (µs, `0` for none).
/// `{1, token}` when taken (and `taken` published on the channel, for leader observers),
/// `{0, pttl}` when not (`pttl` -2: free, but another waiter's turn).
///
/// The token is `max(fence + 1, server time in µs)`, stored back in the fence key: a hybrid
/// logical clock. While the fence key lives, tokens rise by the counter; when it is lost
/// (a restart without persistence, a failover to a replica that missed it, eviction, a
/// FLUSHALL), the server's clock carries on above every token it issued before, as long as
/// that clock did not step back past them. The clock is assembled as a string and compared
/// as a number below 2^53 (µs until the year 2255), so Lua's doubles keep it exact; a fence
/// at or above it is `INCR`ed by Redis itself, exactly.
///
/// A RedLock client proposes one token to every instance (its clock plus a small lead), so
/// that the instances issue the same token and no write-back is needed: the proposal stands
/// in for the server time only when it is later than it and at most [`MAX_LEAD_US`] ahead of
/// it, so a token never runs further ahead of the issuing server's clock than that.
///
/// The queue (a single instance only; RedLock passes mode `0` and leaves it empty): `queue`
/// orders the waiters by arrival (score: server time in µs when first queued), `alive` holds
/// until when each waiter is presumed alive (score: server time in ms; every attempt of the
/// waiter moves it `liveness` ms ahead). A free lock goes only to the first live waiter, or
/// to anyone when nobody waits: a releaser cannot barge in before the waiter it woke. Mode
/// `1` queues the owner when it does not get the lock; mode `0` (`try_lock`, RedLock) never
/// queues. Waiters that stopped refreshing are dropped when the lock is found free.
pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&ACQUIRE_SOURCE.replace("MAX_LEAD_US", &MAX_LEAD_US.to_string())));

/// How far ahead of the issuing server's clock a proposed token may be, in µs (5 ms).
pub(crate) const MAX_LEAD_US: u64 = 5_000;

/// The source of [`ACQUIRE`], with `MAX_LEAD_US` standing for [`MAX_LEAD_US`].
const ACQUIRE_SOURCE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local free
if redis.call('EXISTS', KEYS[3]) == 0 then
    -- Nobody waits: taken if free, in the same call.
    free = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) ~= false
elseif redis.call('EXISTS', KEYS[1]) == 0 then
    free = true
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
    if #dead > 0 then
        redis.call('ZREM', KEYS[4], unpack(dead))
        redis.call('ZREM', KEYS[3], unpack(dead))
    end
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if head and head ~= ARGV[1] then
        free = false
    elseif head then
        redis.call('ZREM', KEYS[3], ARGV[1])
        redis.call('ZREM', KEYS[4], ARGV[1])
    end
    if free then
        redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    end
else
    free = false
end
if free then
    redis.call('PUBLISH', ARGV[5], 'taken')
    local issue = tonumber(time[1] .. string.format('%06d', tonumber(time[2])))
    local proposed = tonumber(ARGV[6]) or 0
    if proposed > issue and proposed <= issue + MAX_LEAD_US then
        issue = proposed
    end
    local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
    if fence and fence >= issue then
        return {1, redis.call('INCR', KEYS[2])}
    end
    redis.call('SET', KEYS[2], string.format('%.0f', issue))
    return {1, issue}
end
if ARGV[3] == '1' then
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    redis.call('ZADD', KEYS[3], 'NX', time[1] .. string.format('%06d', tonumber(time[2])), ARGV[1])
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[1])
end
return {0, redis.call('PTTL', KEYS[1])}
";

/// KEYS: lock, queue, alive. ARGV: owner, channel. Takes a waiter that stopped waiting out of
/// the queue; if the lock is free, tells the next waiter it is its turn.
pub(crate) static DEQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if head then
        redis.call('PUBLISH', ARGV[2], head)
    end
end
return 1
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

/// KEYS: the locks of a batch. ARGV: owner and ttl ms of each, in turn. For each lock 1 if
/// extended, 0 if not ours: one call renews every lease a client is renewing at the moment.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local extended = {}
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[2 * i - 1] then
        extended[i] = redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
    else
        extended[i] = 0
    end
end
return extended
",
    )
});

/// KEYS: lock, queue, value. ARGV: owner, channel, publish (`0` undoes a partial RedLock
/// acquisition quietly, `1` tells RedLock waiters `released`, `2` tells the first queued
/// waiter that it is its turn, by its owner id, or `released` when nobody queues, for leader
/// observers). The holder's value goes with the lock. 1 if released, 0 if not ours.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[3])
    if ARGV[3] == '1' then
        redis.call('PUBLISH', ARGV[2], 'released')
    elseif ARGV[3] == '2' then
        local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
        redis.call('PUBLISH', ARGV[2], head or 'released')
    end
    return 1
end
return 0
",
    )
});

/// KEYS: lock, value. ARGV: owner, sequence number, value (the lease passes
/// `<token> <value>`), channel. Stores `<owner> <sequence> <value>` in the value key if the
/// lock is the owner's (1), else changes nothing (0); publishes `value` on the channel for leader observers. A value the
/// same owner stored with a higher sequence number (a later call that got there first)
/// is kept. The value key has no TTL: the release deletes it, and one left by a holder whose
/// lease ran out names that holder, so it is never shown with a later one.
pub(crate) static SET_VALUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
local current = redis.call('GET', KEYS[2])
if current then
    local owner, sequence = string.match(current, '^(%S+) (%d+) ')
    if owner == ARGV[1] and tonumber(sequence) > tonumber(ARGV[2]) then
        return 1
    end
end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
redis.call('PUBLISH', ARGV[4], 'value')
return 1
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
