-- A worker's call, authorized in one round trip (control/workers.py `authorize`): its
-- token checked and renewed, then one call taken from its rate bucket (lib.lua take_token).
-- A refused token changes nothing, the bucket included.
-- ARGV: worker, sha256 of the token presented, now (the state's clock), the renewed
-- expiry, renew below (seconds left), rate ('' for no rate limit), burst, now for the
-- bucket (real time).
-- Returns {'ok', wait} (wait: '0' to go ahead, else the seconds until a call may), or
-- {'unknown'}, {'wrong'}, {'revoked', revoked_at}, {'expired'}.
-- The hashes compare with ==: what a timing difference could tell is how much of the
-- presented token's sha256 matches, which does not help find a token.
local wk = key('worker', ARGV[2])
local w = redis.call('HMGET', wk, 'token_sha256', 'token_expires_at', 'revoked_at')
if not w[1] then return {'unknown'} end
if w[1] ~= ARGV[3] then return {'wrong'} end
if w[3] and w[3] ~= '' then return {'revoked', w[3]} end
local now = tonumber(ARGV[4])
local expires = tonumber(w[2])
if expires and expires < now then return {'expired'} end
if (not expires) or expires - now < tonumber(ARGV[6]) then
  redis.call('HSET', wk, 'token_expires_at', ARGV[5])
end
if ARGV[7] == '' then return {'ok', '0'} end
return {'ok', tostring(take_token(ARGV[2], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])))}
