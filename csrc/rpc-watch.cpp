#include "rpc-watch.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "ggml.h"

namespace {

std::mutex watch_mutex;
std::vector<std::string> watched;
int watch_exit_code = 75;
ggml_abort_callback_t previous_callback = nullptr;
std::vector<int> notify_fds;  // a server's pipes: the line goes there too, and the server exits itself
int notify_grace_ms = 0;
std::atomic<bool> reported{false};

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

void write_all(int fd, const std::string & text) {
    size_t done = 0;
    while (done < text.size()) {
        const ssize_t n = write(fd, text.data() + done, text.size() - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        done += static_cast<size_t>(n);
    }
}

// One-shot commands exit at once. A server (notify fds registered) gets the line on its pipes and
// `notify_grace_ms` to answer its clients and exit by itself; this thread waits, then ends the process
// anyway, so nothing hangs. A second failing thread (another worker's connection) only waits.
[[noreturn]] void report_and_exit(const std::string & lost_line) {
    std::vector<int> fds;
    int grace_ms, exit_code;
    {
        std::lock_guard<std::mutex> lock(watch_mutex);
        fds = notify_fds;
        grace_ms = notify_grace_ms;
        exit_code = watch_exit_code;
    }
    if (!reported.exchange(true)) {
        if (fds.empty()) {
            std::fprintf(stderr,
                         "ggsteer: error: %s. llama.cpp's RPC backend cannot continue without it in this process; "
                         "exiting with status %d. Restart the worker, then run again.\n",
                         lost_line.c_str(), exit_code);
        } else {
            std::fprintf(stderr, "ggsteer: error: %s; the server ends this process (status %d)\n", lost_line.c_str(),
                         exit_code);
            for (const int fd : fds) {
                write_all(fd, lost_line + "\n");
            }
        }
        std::fflush(stderr);
        std::fflush(stdout);
    }
    if (!fds.empty()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(grace_ms));
    }
    _exit(exit_code);
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
    std::string why = reason != nullptr ? reason + 2 : message;
    while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) {
        why.pop_back();
    }
    const std::string lost_line = "RPC worker " + (lost.empty() ? "(one of " + join(endpoints) + ")" : join(lost)) +
                                  " stopped answering (" + why + ")";
    report_and_exit(lost_line);
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

void rpc_watch_notify(const std::vector<int> & fds, int grace_ms) {
    std::lock_guard<std::mutex> lock(watch_mutex);
    notify_fds = fds;
    notify_grace_ms = std::max(grace_ms, 0);
}
