-- Scenario "tokens-10k": each request carries the next of N distinct valid tokens, round robin.
-- Arguments after `--`: the token file (one token a line) and the request path. The requests
-- are formatted once, in init, so that wrk spends its time sending them.
local requests = {}
local next_index = 0

function init(args)
  local path, route = args[1], args[2]
  for line in io.lines(path) do
    if #line > 0 then
      requests[#requests + 1] =
        wrk.format("GET", route, { ["Authorization"] = "Bearer " .. line })
    end
  end
  if #requests == 0 then
    error("no tokens in " .. tostring(path))
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
