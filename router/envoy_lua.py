"""The Lua filter Envoy runs on every request (router/envoy_config.py puts it in the bootstrap).

For a plain ModelInfer it finds the model id (model_name, walked from the buffered gRPC
message) and admits the caller (anonymous where allowed, or a bearer token whose sha256 the
routes' metadata lists; the token is then replaced by its digest), and names the model in the
`envoy.lb` dynamic metadata the subset load balancer routes by. Anything else it leaves alone,
and the request goes to the Python router. Tested through a real Envoy
(tests/integration/test_envoy.py).
"""

LUA = r"""
-- meshserve (router/envoy_config.py): the model a ModelInfer names, for the subset balancer.
local INFER = "/inference.GRPCInferenceService/ModelInfer"
local MAX_ID = 128

local function varint(s, i)
  local value, scale = 0, 1
  for j = i, math.min(i + 9, #s) do
    local b = s:byte(j)
    value = value + (b % 128) * scale
    if b < 128 then return value, j + 1 end
    scale = scale * 128
  end
  return nil, nil
end

-- name, version of the one uncompressed gRPC message in `body`, or nil
local function model_of(body, size)
  if size < 5 then return nil end
  local head = body:getBytes(0, 5)
  if head:byte(1) ~= 0 then return nil end
  local length = ((head:byte(2) * 256 + head:byte(3)) * 256 + head:byte(4)) * 256 + head:byte(5)
  if length + 5 ~= size then return nil end
  local pos, name, version = 5, "", ""
  while pos < size do
    local chunk = body:getBytes(pos, math.min(20, size - pos))
    local key, i = varint(chunk, 1)
    if key == nil then return nil end
    local field, wire = math.floor(key / 8), key % 8
    if wire == 0 then
      local _, j = varint(chunk, i)
      if j == nil then return nil end
      pos = pos + j - 1
    elseif wire == 2 then
      local n, j = varint(chunk, i)
      if n == nil then return nil end
      local start = pos + j - 1
      if start + n > size then return nil end
      if field == 1 or field == 2 then
        if n > MAX_ID then return nil end
        local text = ""
        if n > 0 then text = body:getBytes(start, n) end
        if field == 1 then name = text else version = text end
      end
      pos = start + n
    elseif wire == 1 then
      pos = pos + i - 1 + 8
    elseif wire == 5 then
      pos = pos + i - 1 + 4
    else
      return nil
    end
  end
  if pos ~= size then return nil end
  return name, version
end

-- sha256 hex of a string (FIPS 180-4), for bearer tokens: the router lists their digests
local bit = require("bit")
local band, bor, bxor, bnot, rshift, lshift, ror, tobit, tohex =
  bit.band, bit.bor, bit.bxor, bit.bnot, bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2}

local function sha256(msg)
  local n = #msg
  local bits = n * 8
  local tail = {}
  for i = 7, 0, -1 do tail[#tail + 1] = string.char(math.floor(bits / 2 ^ (8 * i)) % 256) end
  msg = msg .. "\128" .. string.rep("\0", (55 - n) % 64) .. table.concat(tail)
  local h = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local b1, b2, b3, b4 = msg:byte(chunk + 4 * i, chunk + 4 * i + 3)
      w[i] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, hh = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
    for i = 0, 63 do
      local t1 = tobit(hh + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g)) + K[i + 1] + w[i])
      local t2 = tobit(bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c)))
      hh, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    h[1], h[2], h[3], h[4] = tobit(h[1] + a), tobit(h[2] + b), tobit(h[3] + c), tobit(h[4] + d)
    h[5], h[6], h[7], h[8] = tobit(h[5] + e), tobit(h[6] + f), tobit(h[7] + g), tobit(h[8] + hh)
  end
  local out = {}
  for i = 1, 8 do out[i] = tohex(h[i]) end
  return table.concat(out)
end

-- token -> digest, per worker; cleared when it grows past 4096 tokens
local digests, cached = {}, 0
local function digest(token)
  local d = digests[token]
  if d == nil then
    if cached >= 4096 then digests, cached = {}, 0 end
    d = sha256(token)
    digests[token] = d
    cached = cached + 1
  end
  return d
end

-- Whether the caller may take the direct path: anonymous where the router admits anonymous
-- callers; a bearer token whose digest the router listed (default-tenant and admin tokens
-- that are valid now). Anything else is Python's to answer (UNAUTHENTICATED and the like).
local function admitted(handle, auth)
  local allowed = handle:metadata()
  if auth == nil then return allowed:get("anonymous") == true end
  if auth:sub(1, 7) ~= "Bearer " then return false end
  local token = auth:sub(8)
  if token == "" or token:find("[%s]") then return false end
  return allowed:get("t" .. digest(token)) == true
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("x-mesh-token-sha256")  -- on every RPC: only this filter sets it (below), never a caller
  if headers:get(":path") ~= INFER then return end
  if headers:get("mm-vmodel-id") ~= nil then return end
  local encoding = headers:get("grpc-encoding")
  if encoding ~= nil and encoding ~= "identity" then return end
  local auth = headers:get("authorization")
  if not admitted(handle, auth) then return end
  if auth ~= nil then  -- the token never reaches a pod: Python, if it gets the request, reads its digest
    headers:remove("authorization")
    headers:add("x-mesh-token-sha256", digest(auth:sub(8)))
  end
  local header = headers:get("mm-model-id")  -- read before body(): the headers object is gone after it
  local body = handle:body()
  if body == nil then return end
  local name, version = model_of(body, body:length())
  if name == nil or name == "" or (version ~= "" and version ~= "1") then return end
  if not name:match("^[%w][%w%._%-]*$") then return end
  if header ~= nil and header ~= name then return end
  handle:streamInfo():dynamicMetadata():set("envoy.lb", "models", name)
end
"""
