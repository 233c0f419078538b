-- POST the original client's multipart upload (N `file` fields of image/jpeg), for wrk 4.1:
--
--   WRK_IMAGES=LIST WRK_IMAGES_PER_REQUEST=N wrk -t2 -c16 -d20s -s bench/wrk/predict.lua URL/predict
--
-- LIST is a file naming one image path a line (`find DIR -name '*.jpg' > LIST` will do;
-- bench/load.py writes one). Each thread reads the images and builds every request once, in
-- init(), before the clock starts; then each request is the next pre-built one in turn (each
-- thread starts at a different one), so the generator spends no time encoding. An error is a
-- non-2xx answer (counted here, per status) or a socket error (counted by wrk). done() prints
-- one line, "bench-json {...}", that bench/load.py reads: counts, duration and latency
-- percentiles of every answer, in microseconds.

local BOUNDARY = "bench-load-6b0f3c1d9e2a4f57"
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

local function read_images(list)
   local files = {}
   for path in io.lines(list) do
      if path ~= "" then
         local f = assert(io.open(path, "rb"))
         table.insert(files, { name = path:match("[^/]*$"), data = f:read("*a") })
         f:close()
      end
   end
   assert(#files > 0, "no image paths in " .. list)
   return files
end

function init(args)
   local list = assert(os.getenv("WRK_IMAGES"), "set WRK_IMAGES to a file listing images")
   local per_request = tonumber(os.getenv("WRK_IMAGES_PER_REQUEST") or "1")
   local files = read_images(list)
   local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. BOUNDARY }
   -- Every image once (the last request wraps around to the first images).
   bodies = {}
   for i = 0, math.ceil(#files / per_request) - 1 do
      local parts = {}
      for j = 0, per_request - 1 do
         local file = files[(i * per_request + j) % #files + 1]
         table.insert(parts, "--" .. BOUNDARY .. "\r\n"
            .. 'Content-Disposition: form-data; name="file"; filename="' .. file.name .. '"\r\n'
            .. "Content-Type: image/jpeg\r\n\r\n" .. file.data .. "\r\n")
      end
      table.insert(parts, "--" .. BOUNDARY .. "--\r\n")
      table.insert(bodies, wrk.format("POST", nil, headers, table.concat(parts)))
   end
   turn = (id * 7919) % #bodies  -- threads start apart, as the Python clients share one turn
   non2xx = 0
   statuses = {}
end

function request()
   turn = turn % #bodies + 1
   return bodies[turn]
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      statuses[tostring(status)] = (statuses[tostring(status)] or 0) + 1
   end
end

function done(summary, latency, requests)
   local non2xx, statuses, by_status = 0, {}, {}
   for _, thread in ipairs(threads) do
      non2xx = non2xx + thread:get("non2xx")
      for status, count in pairs(thread:get("statuses")) do
         statuses[status] = (statuses[status] or 0) + count
      end
   end
   for status, count in pairs(statuses) do
      table.insert(by_status, string.format('"%s": %d', status, count))
   end
   local e = summary.errors
   io.write(string.format(
      'bench-json {"duration_us": %d, "answers": %d, "non2xx": %d, "statuses": {%s}, '
      .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, '
      .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.duration, summary.requests, non2xx, table.concat(by_status, ", "),
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
