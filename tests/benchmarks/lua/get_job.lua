-- wrk script: GET /jobs/{id} over a list of job ids read from the file named by
-- WRK_JOB_IDS (one per line). Prints a WRK_JSON line like post_generate.lua.
local threads = {}
local ids = {}
for line in io.lines(os.getenv("WRK_JOB_IDS")) do
  table.insert(ids, line)
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  index = 0
end

function request()
  index = index % #ids + 1
  return wrk.format("GET", "/jobs/" .. ids[index])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      counts[code] = (counts[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(parts, ",")))
end
