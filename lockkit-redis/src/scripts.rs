//! The Lua scripts, loaded once per connection (EVALSHA, with a fallback on NOSCRIPT).

use std::sync::LazyLock;

use redis::Script;

/// KEYS: lock, fence, queue, alive, asked. ARGV: owner, ttl ms, mode, liveness ms, channel,
/// proposed token (µs, `0` for none), attempt number (mode `1`).
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
/// waiter moves it `liveness` ms ahead), and `asked` what each waiter asks for (`<ttl ms>
/// <attempt number>`: its TTL, for a [hand-off](RELEASE), and the number of its latest
/// attempt the server has seen). A free lock goes only to the first live waiter, or
/// to anyone when nobody waits: a releaser cannot barge in before the waiter it woke. Mode
/// `1` queues the owner when it does not get the lock; mode `0` (`try_lock`, RedLock) never
/// queues. Waiters that stopped refreshing are dropped when the lock is found free.
///
/// A mode `1` attempt that finds the lock already its own was handed it by a release whose
/// message it missed (a resubscription, a re-check that crossed the message): the lease is
/// renewed to the attempt's TTL from now, so the waiter counts it valid from when it sent
/// this attempt, and the token issued at the hand-off (the fence counter, which only moves
/// when the lock is granted) is returned. Mode `0` never does this: a RedLock attempt whose
/// earlier undo did not reach an instance must not count that instance's old key as won.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{}",
        library(),
        ACQUIRE_SOURCE.replace("MAX_LEAD_US", &MAX_LEAD_US.to_string())
    ))
});

/// How far ahead of the issuing server's clock a proposed token may be, in µs (5 ms).
pub(crate) const MAX_LEAD_US: u64 = 5_000;

/// The functions the scripts that grant the lock share: a script is the library followed by
/// its own body (Lua scripts cannot load one another).
///
/// - `micros(time)` / `millis(time)`: the server's `TIME` in µs (exact below 2^53) / in ms.
/// - `issue(fence, at)`: the next fencing token, `max(fence + 1, at)`, stored back.
/// - `forget(queue, alive, asked, ...)`: takes the waiters named out of the queue.
/// - `drop_dead(queue, alive, asked, now)`: forgets (at most 100) waiters whose liveness
///   deadline passed.
/// - `hand_off(lock, fence, queue, alive, asked, channel, time)`: see [`RELEASE`]; true if
///   a waiter was there (handed the lock, or woken).
fn library() -> &'static str {
    r"
if redis.replicate_commands then redis.replicate_commands() end
local function micros(time)
    return tonumber(time[1] .. string.format('%06d', tonumber(time[2])))
end
local function millis(time)
    return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local function issue(fence, at)
    local current = tonumber(redis.call('GET', fence) or '0')
    if current and current >= at then
        return redis.call('INCR', fence)
    end
    redis.call('SET', fence, string.format('%.0f', at))
    return at
end
local function forget(queue, alive, asked, ...)
    redis.call('ZREM', queue, ...)
    redis.call('ZREM', alive, ...)
    redis.call('HDEL', asked, ...)
end
local function drop_dead(queue, alive, asked, now)
    local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', now, 'LIMIT', 0, 100)
    if #dead > 0 then
        forget(queue, alive, asked, unpack(dead))
    end
end
local function hand_off(lock, fence, queue, alive, asked, channel, time)
    local now = millis(time)
    drop_dead(queue, alive, asked, now)
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then
        return false
    end
    local ttl, attempt = string.match(redis.call('HGET', asked, head) or '', '^(%d+) (%d+)$')
    local deadline = tonumber(redis.call('ZSCORE', alive, head) or '0')
    if not ttl or deadline <= now then
        -- Only woken: on its own channel, and on the name's, where an older client listens.
        redis.call('PUBLISH', channel .. ':' .. head, head)
        redis.call('PUBLISH', channel, head)
        return true
    end
    forget(queue, alive, asked, head)
    redis.call('SET', lock, head, 'PX', ttl)
    local token = issue(fence, micros(time))
    redis.call('PUBLISH', channel .. ':' .. head,
        head .. ' ' .. string.format('%.0f', token) .. ' ' .. attempt)
    redis.call('PUBLISH', channel, 'taken')
    return true
end
"
}

/// The body of [`ACQUIRE`], with `MAX_LEAD_US` standing for [`MAX_LEAD_US`].
const ACQUIRE_SOURCE: &str = r"
local time = redis.call('TIME')
local free
if redis.call('EXISTS', KEYS[3]) == 0 then
    -- Nobody waits: taken if free, in the same call.
    free = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) ~= false
elseif redis.call('EXISTS', KEYS[1]) == 0 then
    free = true
    drop_dead(KEYS[3], KEYS[4], KEYS[5], millis(time))
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if head and head ~= ARGV[1] then
        free = false
    elseif head then
        forget(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
    end
    if free then
        redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    end
else
    free = false
end
-- Not free: a waiter's attempt may find it already its own (handed over), checked only here
-- so the uncontended path stays one SET.
if not free and ARGV[3] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    forget(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
    return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if free then
    redis.call('PUBLISH', ARGV[5], 'taken')
    local at = micros(time)
    local proposed = tonumber(ARGV[6]) or 0
    if proposed > at and proposed <= at + MAX_LEAD_US then
        at = proposed
    end
    return {1, issue(KEYS[2], at)}
end
if ARGV[3] == '1' then
    redis.call('ZADD', KEYS[3], 'NX', time[1] .. string.format('%06d', tonumber(time[2])), ARGV[1])
    redis.call('ZADD', KEYS[4], millis(time) + tonumber(ARGV[4]), ARGV[1])
    redis.call('HSET', KEYS[5], ARGV[1], ARGV[2] .. ' ' .. ARGV[7])
end
return {0, redis.call('PTTL', KEYS[1])}
";

/// KEYS: lock, queue, alive, fence, asked. ARGV: owner, channel. Takes a waiter that stopped
/// waiting out of the queue. If a release had already handed it the lock (it left before it
/// saw the message, or crashed), it gives the lock back (owner-checked) and hands it to the
/// next live waiter, or publishes `released` when nobody waits: a waiter that left holds
/// nothing. If the lock is free, it is handed to the next live waiter likewise.
pub(crate) static DEQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{}",
        library(),
        r"
forget(KEYS[2], KEYS[3], KEYS[5], ARGV[1])
local mine = redis.call('GET', KEYS[1]) == ARGV[1]
if mine then
    redis.call('DEL', KEYS[1])
end
if mine or redis.call('EXISTS', KEYS[1]) == 0 then
    local time = redis.call('TIME')
    local waiter = hand_off(KEYS[1], KEYS[4], KEYS[2], KEYS[3], KEYS[5], ARGV[2], time)
    if mine and not waiter then
        redis.call('PUBLISH', ARGV[2], 'released')
    end
end
return 1
"
    ))
});

/// KEYS: lock, fence. ARGV: owner, ttl ms (`0`: keep the key's TTL). The fence counter if
/// the lock is ours (an acquisition whose answer was lost went through, or, for a queued
/// waiter, a release handed it the lock), else -1.
///
/// A queued waiter passes its TTL, and the key is renewed to it from now: the lock may have
/// been handed to it before the attempt whose answer was lost was even sent, and the waiter
/// counts the lease valid from that attempt. RedLock passes `0` (its waiters do not queue).
pub(crate) static RECOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    if ARGV[2] ~= '0' then
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
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

/// KEYS: lock, queue, value, fence, alive, asked. ARGV: owner, channel, publish (`0` undoes
/// a partial RedLock acquisition quietly, `1` tells RedLock waiters `released`, `2` hands the
/// lock to the first live queued waiter of a single instance). The holder's value goes with
/// the lock. 1 if released, 0 if not ours.
///
/// The hand-off (mode `2`): the first queued waiter whose liveness deadline has not passed
/// (dead ones are dropped first) becomes the owner in the same script: the lock key is set
/// to its owner id with the TTL it asked for when it queued (kept in `asked`), a token is
/// issued as by [`ACQUIRE`] (so tokens keep rising), the waiter leaves the queue, and
/// `<owner> <token> <attempt>` is published on the waiter's own channel, `<channel>:<owner>`
/// (only that waiter's connection receives it, however many clients wait), and `taken` on
/// the name's channel for leader observers: the waiter returns the lock without another
/// round trip. `<attempt>` is the number of the waiter's latest attempt the server had seen
/// when it granted the lock: the waiter sent that attempt before the grant, and the lease
/// runs from the grant, so the waiter counts it valid from when it sent that attempt (less
/// the drift allowance), a bound that holds whatever the clocks read. A message for an
/// earlier attempt than the waiter's latest is stale (that attempt would have found the lock
/// its own) and is ignored. A waiter that did not store what it asks for (an older client)
/// is only woken, by its owner id on its own channel and on the name's (where a client from
/// before the per-waiter channels listens), and takes the lock with its own attempt;
/// `released` is
/// published when nobody waits, for leader observers. The owner ids are hex, without spaces.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{}",
        library(),
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[3])
    if ARGV[3] == '1' then
        redis.call('PUBLISH', ARGV[2], 'released')
    elseif ARGV[3] == '2' then
        -- Nobody queued (the uncontended release): no hand-off to look for.
        local queued = redis.call('EXISTS', KEYS[2]) == 1
        if not (queued and hand_off(KEYS[1], KEYS[4], KEYS[2], KEYS[5], KEYS[6], ARGV[2],
                redis.call('TIME'))) then
            redis.call('PUBLISH', ARGV[2], 'released')
        end
    end
    return 1
end
return 0
"
    ))
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
