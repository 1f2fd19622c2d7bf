// store_shim.cpp: see store_shim.h.
#include "store_shim.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/exception.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

struct VsStore {
    std::unique_ptr<c10d::TCPStore> store;
};

namespace {

void write_error(VsError* err, const char* what) {
    if (err == nullptr) {
        return;
    }
    std::strncpy(err->message, what, VS_ERROR_LEN - 1);
    err->message[VS_ERROR_LEN - 1] = '\0';
}

// Runs f, turning any C++ exception into VS_FAILED (or VS_TIMEOUT for c10d's timeout errors) and a message.
template <typename F>
int guarded(VsError* err, F&& f) {
    try {
        f();
        return VS_OK;
    } catch (const c10d::TimeoutError& e) {
        write_error(err, e.what_without_backtrace());
        return VS_TIMEOUT;
    } catch (const c10::DistStoreError& e) {
        write_error(err, e.what_without_backtrace());
        return std::strstr(e.what_without_backtrace(), "imeout") != nullptr ||
                       std::strstr(e.what_without_backtrace(), "timed out") != nullptr
                   ? VS_TIMEOUT
                   : VS_FAILED;
    } catch (const c10::Error& e) {
        write_error(err, e.what_without_backtrace());
        return VS_FAILED;
    } catch (const std::exception& e) {
        write_error(err, e.what());
        return VS_FAILED;
    } catch (...) {
        write_error(err, "unknown C++ exception in the TCPStore");
        return VS_FAILED;
    }
}

std::vector<std::string> key_list(const char* const* keys, size_t n) {
    std::vector<std::string> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        out.emplace_back(keys[i]);
    }
    return out;
}

}  // namespace

extern "C" {

VsStore* vs_store_create(const char* host, uint16_t port, int is_server, int num_workers, int wait_workers,
                         int64_t timeout_ms, VsError* err) {
    VsStore* out = nullptr;
    guarded(err, [&] {
        c10d::TCPStoreOptions opts;
        opts.port = port;
        opts.isServer = is_server != 0;
        if (num_workers > 0) {
            opts.numWorkers = static_cast<size_t>(num_workers);
        }
        opts.waitWorkers = wait_workers != 0;
        opts.timeout = std::chrono::milliseconds(timeout_ms);
        auto s = std::make_unique<VsStore>();
        s->store = std::make_unique<c10d::TCPStore>(std::string(host), opts);
        out = s.release();
    });
    return out;
}

void vs_store_destroy(VsStore* store) {
    try {
        delete store;
    } catch (...) {
    }
}

int vs_store_port(VsStore* store, uint16_t* port, VsError* err) {
    return guarded(err, [&] { *port = store->store->getPort(); });
}

int vs_store_set(VsStore* store, const char* key, const uint8_t* data, size_t len, VsError* err) {
    return guarded(err, [&] { store->store->set(std::string(key), std::vector<uint8_t>(data, data + len)); });
}

int vs_store_get(VsStore* store, const char* key, uint8_t** data, size_t* len, VsError* err) {
    *data = nullptr;
    *len = 0;
    return guarded(err, [&] {
        std::vector<uint8_t> v = store->store->get(std::string(key));
        auto* buf = static_cast<uint8_t*>(std::malloc(v.empty() ? 1 : v.size()));
        if (buf == nullptr) {
            throw std::bad_alloc();
        }
        if (!v.empty()) {
            std::memcpy(buf, v.data(), v.size());
        }
        *data = buf;
        *len = v.size();
    });
}

int vs_store_add(VsStore* store, const char* key, int64_t delta, int64_t* value, VsError* err) {
    return guarded(err, [&] { *value = store->store->add(std::string(key), delta); });
}

int vs_store_check(VsStore* store, const char* const* keys, size_t n, int* exists, VsError* err) {
    return guarded(err, [&] { *exists = store->store->check(key_list(keys, n)) ? 1 : 0; });
}

int vs_store_wait(VsStore* store, const char* const* keys, size_t n, int64_t timeout_ms, VsError* err) {
    return guarded(err, [&] { store->store->wait(key_list(keys, n), std::chrono::milliseconds(timeout_ms)); });
}

void vs_free(void* p) {
    std::free(p);
}

}  // extern "C"
