-- Thrash loop for wrk: each connection does PUT, GET, DELETE of a fresh key, over and over.
--
-- Run with as many threads as connections (wrk -t16 -c16): wrk runs all connections of a
-- thread in one Lua state, so one connection per thread is what makes the per-thread
-- PUT -> GET -> DELETE sequence below well defined.
--
-- Arguments after `--`: MODE PREFIX
--   MODE   "index" (GET expects 302, not followed) or "nginx" (GET expects 200), or
--          "replicas": what the index asks of nginx for one loop, straight to one nginx:
--          PUT three files, then DELETE them (bench/run.py measures its CPU per loop)
--   PREFIX path prefix that makes keys unique to this run, e.g. /thrash-1a2b or /thrash/1a2b
-- Keys are PREFIX/<thread id>/<counter>, so they never collide across threads or runs.
-- done() prints "thrash_errors N", "thrash_loops N" and a few unexpected statuses.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local steps = {"PUT", "GET", "DELETE"}
local files = {"", "", ""}  -- the file of each step, below the loop's path
local expected = {PUT = 201, GET = 302, DELETE = 204}
local body = string.rep("x", 1024)
local prefix = "/thrash"
local step = 1
local counter = 0

errors = 0
loops = 0
bad = ""

function init(args)
   -- wrk passes the URL as args[0] and the words after `--` from args[1] on
   if args[1] == "nginx" then
      expected.GET = 200
   elseif args[1] == "replicas" then
      steps = {"PUT", "PUT", "PUT", "DELETE", "DELETE", "DELETE"}
      files = {"/1", "/2", "/3", "/1", "/2", "/3"}
   end
   if args[2] then
      prefix = args[2]
   end
end

local function path()
   return string.format("%s/%d/%d%s", prefix, id, counter, files[step])
end

function request()
   -- The state only advances in response(): if wrk reconnects and asks again, the same
   -- step is sent again instead of being skipped.
   local method = steps[step]
   if method == "PUT" then
      return wrk.format("PUT", path(), {}, body)
   end
   return wrk.format(method, path(), {})
end

function response(status, headers, body)
   local method = steps[step]
   if status ~= expected[method] then
      errors = errors + 1
      if #bad < 200 then
         bad = bad .. string.format(" %s=%d", method, status)
      end
   end
   step = step + 1
   if step > #steps then
      step = 1
      counter = counter + 1
      loops = loops + 1
   end
end

function done(summary, latency, requests)
   local total_errors, total_loops, samples = 0, 0, ""
   for _, thread in ipairs(threads) do
      total_errors = total_errors + thread:get("errors")
      total_loops = total_loops + thread:get("loops")
      local b = thread:get("bad")
      if b ~= "" and #samples < 200 then
         samples = samples .. b
      end
   end
   io.write(string.format("thrash_errors %d\n", total_errors))
   io.write(string.format("thrash_loops %d\n", total_loops))
   if samples ~= "" then
      io.write("thrash_bad" .. samples .. "\n")
   end
end
