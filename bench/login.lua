-- The login storm: POST {prefix}/login with correct passwords, each request the next of the
-- JSON bodies in the file given after `--` (one a line), round robin over the storm users.
-- Arguments after `--`: the bodies file and the login path.
local requests = {}
local next_index = 0

function init(args)
  local path, route = args[1], args[2]
  for line in io.lines(path) do
    if #line > 0 then
      requests[#requests + 1] =
        wrk.format("POST", route, { ["Content-Type"] = "application/json" }, line)
    end
  end
  if #requests == 0 then
    error("no login bodies in " .. tostring(path))
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
