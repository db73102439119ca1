// A worker of llama.cpp's RPC backend lost mid-run: ggml-rpc aborts the process on any failed
// send or receive. This replaces that abort by one line naming the worker and a clean exit.
#pragma once

#include <string>
#include <vector>

// Installs ggml's abort callback (once) and adds `endpoints` ("host:port") to those it names.
void rpc_watch_workers(const std::vector<std::string> & endpoints, int exit_code);
