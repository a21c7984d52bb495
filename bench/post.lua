-- Scenario "post-64k": a 64 KiB request body (the token comes from wrk's -H).
wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
