// A worker of llama.cpp's RPC backend lost mid-run: ggml-rpc aborts the process on any failed
// send or receive. This replaces that abort by one line naming the worker and a clean exit (for a
// server: after telling it through its pipes, so it can answer its clients first).
#pragma once

#include <string>
#include <vector>

// Installs ggml's abort callback (once) and adds `endpoints` ("host:port") to those it names.
void rpc_watch_workers(const std::vector<std::string> & endpoints, int exit_code);

// Server mode: the line naming the lost worker is also written to each of `fds`, and the failing thread
// waits `grace_ms` for the server to exit by itself before it ends the process with exit_code.
void rpc_watch_notify(const std::vector<int> & fds, int grace_ms);
