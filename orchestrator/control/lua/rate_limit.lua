-- One call of a worker against its token bucket: `rate` calls a second on average, bursts
-- of up to `burst`. The bucket is refilled by the time passed since its last call and
-- forgotten once it would be full again.
-- ARGV: worker, rate, burst, now.
-- Returns '0' when the call may go ahead, else the seconds until one may (as a string).
local bk = key('rate', ARGV[2])
local rate, burst, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local b = redis.call('HMGET', bk, 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(now - at, 0) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', bk, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', bk, math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
