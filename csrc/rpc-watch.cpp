#include "rpc-watch.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "ggml.h"

namespace {

std::mutex watch_mutex;
std::vector<std::string> watched;
int watch_exit_code = 75;
ggml_abort_callback_t previous_callback = nullptr;

// Whether something accepts a TCP connection on host:port within `timeout_ms`.
bool accepts_connections(const std::string & endpoint, int timeout_ms) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos) {
        return false;
    }
    const std::string host = endpoint.substr(0, colon), port = endpoint.substr(colon + 1);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) {
        return false;
    }
    bool ok = false;
    for (addrinfo * a = found; a != nullptr && !ok; a = a->ai_next) {
        const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
            continue;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            ok = true;
        } else if (errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            int error = 0;
            socklen_t len = sizeof(error);
            ok = poll(&p, 1, timeout_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
        }
        close(fd);
    }
    freeaddrinfo(found);
    return ok;
}

std::string join(const std::vector<std::string> & items) {
    std::string out;
    for (const std::string & item : items) {
        out += (out.empty() ? "" : ", ") + item;
    }
    return out;
}

// Runs on whichever thread met the failure (ggml-rpc's dispatcher thread, mostly): no Python here,
// which could wait forever for the interpreter's lock while the main thread waits for this one.
void on_ggml_abort(const char * message) {
    std::vector<std::string> endpoints;
    {
        std::lock_guard<std::mutex> lock(watch_mutex);
        endpoints = watched;
    }
    if (std::strstr(message, "ggml-rpc") == nullptr || endpoints.empty()) {
        if (previous_callback != nullptr) {
            previous_callback(message);
        } else {
            std::fprintf(stderr, "%s\n", message);
        }
        return;  // ggml aborts
    }
    std::vector<std::string> lost;
    for (int attempt = 0; attempt < 20 && lost.empty(); ++attempt) {
        if (attempt > 0) {
            usleep(100 * 1000);  // a worker being killed may hold its port for a moment
        }
        for (const std::string & endpoint : endpoints) {
            if (!accepts_connections(endpoint, 1000)) {
                lost.push_back(endpoint);
            }
        }
    }
    const char * reason = std::strstr(message, ": ");  // past ggml's "file:line: "
    reason = reason != nullptr ? reason + 2 : message;
    std::fprintf(stderr,
                 "ggsteer: error: RPC worker %s stopped answering (%s). llama.cpp's RPC backend cannot continue "
                 "without it in this process; exiting with status %d. Restart the worker, then run again.\n",
                 lost.empty() ? ("one of " + join(endpoints)).c_str() : join(lost).c_str(), reason, watch_exit_code);
    std::fflush(stderr);
    std::fflush(stdout);
    _exit(watch_exit_code);
}

}  // namespace

void rpc_watch_workers(const std::vector<std::string> & endpoints, int exit_code) {
    std::lock_guard<std::mutex> lock(watch_mutex);
    if (watched.empty()) {
        ggml_abort_callback_t previous = ggml_set_abort_callback(on_ggml_abort);
        if (previous != on_ggml_abort) {
            previous_callback = previous;
        }
    }
    for (const std::string & endpoint : endpoints) {
        if (std::find(watched.begin(), watched.end(), endpoint) == watched.end()) {
            watched.push_back(endpoint);
        }
    }
    watch_exit_code = exit_code;
}
